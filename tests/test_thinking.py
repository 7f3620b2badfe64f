"""Thinking mode: prompts token-exact against the model card's recipe and the Qwen3 backbone's own chat template
(rendered by transformers' `apply_chat_template(..., enable_thinking=...)`), the reasoning/answer split, and the
thinking budget in the generation loop (single, chat, batch).

The card's recipe is written here as the card writes it (InternVL3.5 model card, "Thinking Mode"): the system
prompt below, set as `model.system_message`, then `model.chat(...)`, whose template (`internvl2_5`) renders
`<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`.
"""

import mlx.core as mx
import pytest
from conftest import ASSETS

import mlx_internvl
from builders import Case
from mlx_internvl.chat import ChatSession
from mlx_internvl.errors import UserError
from mlx_internvl.generate import batch_generate, generate
from mlx_internvl.processing import Processor
from mlx_internvl.sampling import SamplingOptions
from mlx_internvl.templates import INTERNVL2_5_SYSTEM
from mlx_internvl.thinking import ReasoningParser, ThinkingBudget, split_reasoning
from mlx_internvl.tokenizer import load_tokenizer

INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
CARD_R1 = """
You are an AI assistant that rigorously follows this response protocol:

1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.

2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the answer from the think section with a newline.

Ensure that the thinking process is thorough but remains focused on the query. The final answer should be standalone and not reference the thinking section.
""".strip()  # noqa: E501
Q1, A1, Q2 = "Which is larger, 9.11 or 9.8?", "<think>\nCompare the tenths.\n</think>\n\n9.8 is larger.", "Why?"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """(transformers tokenizer, our Processor) for the Qwen3 tokenizer with InternVL's tokens appended."""
    from transformers import AutoTokenizer

    from mlx_internvl.config import ModelConfig, VisionConfig

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "qwen3"))
    tok.add_tokens(INTERNVL_TOKENS, special_tokens=True)
    out = tmp_path_factory.mktemp("qwen3_internvl")
    tok.save_pretrained(str(out))
    cfg = ModelConfig(vision_config=VisionConfig(), llm_config={"model_type": "qwen3",
                      "max_position_embeddings": 40960}, template="internvl2_5", source_format="original")
    return tok, Processor(load_tokenizer(out), cfg)


def card_prompt(system, turns, question):
    """upstream chat(): `template.system_message = system`, then `append_message` per turn, as the card runs it."""
    out = f"<|im_start|>system\n{system}<|im_end|>\n"
    for q, a in turns:
        out += f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
    return out + f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def test_thinking_on_is_the_cards_recipe(qwen3):
    tok, proc = qwen3
    ours = proc.render(Q1, thinking=True)
    assert ours.text == card_prompt(CARD_R1, [], Q1)
    assert ours.ids == tok.encode(card_prompt(CARD_R1, [], Q1))
    # The backbone's own template, thinking on, with the card's system prompt: the same tokens.
    msgs = [{"role": "system", "content": CARD_R1}, {"role": "user", "content": Q1}]
    assert ours.ids == tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True, tokenize=True,
                                               return_dict=False)
    # History as upstream chat(history=...) keeps it: the whole answer, think block included.
    again = proc.render(Q2, history=[(Q1, A1)], thinking=True)
    assert again.ids == tok.encode(card_prompt(CARD_R1, [(Q1, A1)], Q2))
    # An explicit system message is the caller's choice and is kept.
    assert proc.render(Q1, system_message="Be brief.", thinking=True).text == card_prompt("Be brief.", [], Q1)


def test_thinking_off_is_the_empty_think_block(qwen3):
    tok, proc = qwen3
    ours = proc.render(Q1, thinking=False)
    msgs = [{"role": "system", "content": INTERNVL2_5_SYSTEM}, {"role": "user", "content": Q1}]
    theirs = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=True,
                                     return_dict=False)
    assert ours.ids == theirs
    assert ours.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # The default (None) is upstream chat() untouched: the default system message, no think block.
    assert proc.render(Q1).text == card_prompt(INTERNVL2_5_SYSTEM, [], Q1)


@pytest.mark.parametrize("in_think", [False, True])
def test_reasoning_parser_streams_token_by_token(qwen3, in_think):
    tok, _ = qwen3
    reply = "\n<think>\nCompare the tenths: 8 > 1.\n</think>\n\n9.8 is larger.\n"
    if in_think:
        reply = reply.replace("\n<think>", "", 1)
    ids = tok.encode(reply)
    assert 151667 in ids or in_think  # <think> is one token of the Qwen3 tokenizer
    parser = ReasoningParser(in_think=in_think)
    pieces = [parser.feed(tok.decode([i])) for i in ids] + [parser.finish()]
    reasoning, answer = "".join(p[0] for p in pieces), "".join(p[1] for p in pieces)
    assert (reasoning, answer) == ("Compare the tenths: 8 > 1.", "9.8 is larger.")
    # A tag cut inside (character pieces) is recognised too; the whole-text helper agrees.
    parser = ReasoningParser(in_think=in_think)
    chars = [parser.feed(c) for c in reply] + [parser.finish()]
    assert ("".join(p[0] for p in chars), "".join(p[1] for p in chars)) == (reasoning, answer)
    assert split_reasoning(reply, in_think) == (reasoning, answer)
    assert split_reasoning("no tags here") == ("", "no tags here")
