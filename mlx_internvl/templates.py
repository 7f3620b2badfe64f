"""Conversation templates of the released InternVL checkpoints, rendered as upstream `chat()` renders them.

All are of the "MPT" separator style: the system block and its separator (always emitted, even for an empty
system message), then `role + message + sep` per finished message, and the bare role for the turn being generated.
Only `internvl2_5` puts a newline after `<|im_end|>`; that newline matters for token-exact prompts.

InternVL3.5-GPT-OSS's `internvl3_5_gpt_oss` is OpenAI's harmony format in that mould ("MPT_TWO"): messages are
`<|start|>{role}<|message|>...<|end|>`, the assistant's role is a bare `<|start|>assistant` (the model writes its
own `<|channel|>analysis|final<|message|>` header), and a conversation that ends with an assistant message closes
it with `<|return|>` instead of `<|end|>` - the token generation stops on. Upstream decodes these replies with the
special tokens kept (`decode_special`), so a reply reads `<|channel|>final<|message|>...` and that is what its
history replays (a plain answer, as training data and chat clients send it, is put in the final channel);
`thinking.HarmonyParser` splits the analysis channel (reasoning) from the final one (the answer).

Which template a checkpoint uses comes from its config's `template` field (original layout); `-hf` checkpoints
have none, so it is recognised from their chat template (`template_from_chat_template`). InternVL3.5-GPT-OSS's
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from .errors import UserError
from .validate import conversation

INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: E501
GPT_OSS_SYSTEM = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: "
                  "2024-06\nCurrent date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be "
                  "included for every message.")
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"  # noqa: E501


USER, ASSISTANT = 0, 1  # message roles: the index into `Template.roles`
# Role names as chat APIs (OpenAI: user/assistant) and InternVL's training data (human/gpt) spell them.
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
# (role, text): role USER or ASSISTANT, or a role header written as is (a language model's own role, such as
# InternLM2's tool-result turn `<|im_start|>environment name=<|plugin|>\n`: see `tools.py`).
Message = Tuple[Union[int, str], Optional[str]]


@dataclass(frozen=True)
class Template:
    name: str
    system_template: str
    system_message: str
    roles: Tuple[str, str]
    sep: str
    # "MPT_TWO": the separator after the last message of a conversation when that message is the assistant's.
    sep2: Optional[str] = None
    # Upstream decodes replies with `skip_special_tokens=False` (GPT-OSS: the harmony channel markers stay).
    decode_special: bool = False
    # Written before an assistant message that lacks it (GPT-OSS: a plain answer goes in the final channel, as
    # upstream's training data renders it and as its replies, kept with their markers, replay in history).
    reply_header: str = ""

    def __post_init__(self):
        if not (self.sep2 or self.sep).startswith(self.stop_str):
            raise ValueError(f"template {self.name}: separator {self.sep!r} does not start with {self.stop_str!r}")

    @property
    def stop_str(self) -> str:
        """The token that ends the assistant's reply (`sep2` or else `sep`, stripped), which generation stops on."""
        return (self.sep2 or self.sep).strip()

    def _separator(self, index: int, role: int, n_messages: int) -> str:
        if self.sep2 is not None and role == ASSISTANT and index == n_messages - 1:
            return self.sep2
        return self.sep

    def render_spans(self, system_message: Optional[str], messages: Sequence[Message]
                     ) -> Tuple[str, List[Tuple[int, int]]]:
        """The conversation as text, and the character span of each assistant message with its stop token.

        `messages` are (USER | ASSISTANT, text); text None is the turn to generate (its bare role). The system
        block and its separator are always written, even for an empty system message (None: the template's)."""
        system = self.system_message if system_message is None else system_message
        out = self.system_template.format(system_message=system) + self.sep
        spans = []
        for i, (role, text) in enumerate(messages):
            out += self.roles[role] if isinstance(role, int) else role
            if text is None:
                continue
            sep = self._separator(i, role, len(messages))
            if role == ASSISTANT and self.reply_header and not text.startswith("<|"):  # no header of its own
                text = self.reply_header + text
            if role == ASSISTANT:
                spans.append((len(out), len(out) + len(text) + len(sep.strip())))
            out += text + sep
        return out, spans


_CHATML = dict(system_template="<|im_start|>system\n{system_message}",
               roles=("<|im_start|>user\n", "<|im_start|>assistant\n"))

TEMPLATES = {
    "Hermes-2": Template("Hermes-2", system_message=INTERNVL_SYSTEM, sep="<|im_end|>", **_CHATML),
    "internlm2-chat": Template("internlm2-chat", system_message=INTERNVL_SYSTEM, sep="<|im_end|>", **_CHATML),
    "internvl2_5": Template("internvl2_5", system_message=INTERNVL2_5_SYSTEM, sep="<|im_end|>\n", **_CHATML),
    "phi3-chat": Template(
        "phi3-chat",
        system_template="<|system|>\n{system_message}",
        system_message=INTERNVL_SYSTEM,
        roles=("<|user|>\n", "<|assistant|>\n"),
        sep="<|end|>",
    ),
    "internvl3_5_gpt_oss": Template(
        "internvl3_5_gpt_oss",
        system_template="<|start|>system<|message|>{system_message}",
        system_message=GPT_OSS_SYSTEM,
        roles=("<|start|>user<|message|>", "<|start|>assistant"),
        sep="<|end|>",
        sep2="<|return|>",
        decode_special=True,
        reply_header="<|channel|>final<|message|>",
    ),
}


UNSUPPORTED = {
    "internvl_zh": "it belongs to InternVL-Chat-V1-1, which mlx-internvl does not support",
}


def get_template(name: Optional[str]) -> Template:
    """The template called `name` (None: `internvl2_5`, the template of InternVL2.5, 3 and 3.5)."""
    if name is None:
        name = "internvl2_5"
    if name in UNSUPPORTED:
        raise UserError(f"template {name!r} is not supported: {UNSUPPORTED[name]}")
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}. "
                        "Pass one of them with --template (or template=...).")
    return TEMPLATES[name]


def template_from_chat_template(chat_template: Optional[str]) -> Optional[str]:
    """The upstream template a Hugging Face chat template stands for, by the markers it writes; None if unknown.

    transformers' `-hf` conversions all carry a ChatML template with a newline after `<|im_end|>`, the layout of
    `internvl2_5`."""
    if not chat_template:
        return None
    if "<|start|>" in chat_template and "<|message|>" in chat_template:
        return "internvl3_5_gpt_oss"
    if "<|im_start|>" in chat_template:
        return "internvl2_5"
    if "<|user|>" in chat_template and "<|end|>" in chat_template:
        return "phi3-chat"
    return None


def chat_messages(question: str, history: Optional[Sequence[Tuple[str, str]]] = None) -> List[Message]:
    """`history` [(question, answer), ...] and the new `question`, ending with the turn to generate. As upstream
    `chat()` renders them, an empty message is left open (its role without a separator)."""
    messages: List[Message] = []
    for q, a in list(history or []) + [(question, "")]:
        messages += [(USER, q or None), (ASSISTANT, a or None)]
    return messages


def build_query(
    template: Template,
    question: str,
    history: Optional[List[Tuple[str, str]]] = None,
    system_message: Optional[str] = None,
) -> str:
    """The full prompt for `question` after `history` [(question, answer), ...], ending with the assistant role."""
    conversation(question, history, system_message)
    return template.render_spans(system_message, chat_messages(question, history))[0]
