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


# --- the budget, in the generation loop ---------------------------------------------------------------------------

CASE = Case("think_qwen3", text="qwen3", think_tokens=True, seed=5,
            extra_text={"max_position_embeddings": 2048})  # room for the thinking system prompt


@pytest.fixture(scope="module")
def tiny(build_case):
    from transformers import AutoTokenizer

    built = build_case(CASE)
    model, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    hf = AutoTokenizer.from_pretrained(str(built.hf_dir))
    ids = {t: hf.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<|im_end|>", "a", "b", "c")}
    ids["nl"] = hf.encode("\n\n", add_special_tokens=False)
    return model, processor, hf, ids


def scripted(*scripts):
    """A greedy sampler that prefers, at step k, row r's `scripts[r][k]` by a large margin, within what the logits
    processors left possible (a token they set to -inf stays impossible): random weights, a known reply."""
    step = [0]

    def sampler(logprobs):
        k = step[0]
        step[0] += 1
        rows = [s[min(k, len(s) - 1)] for s in scripts][: logprobs.shape[0]]
        bonus = mx.array([[1e4 if v == t else 0.0 for v in range(logprobs.shape[-1])] for t in rows])
        return mx.argmax(logprobs + bonus, axis=-1)

    return lambda self, special_tokens=(): (sampler, [])


def test_budget_forces_the_end_of_thinking_and_the_answer_follows(tiny, monkeypatch):
    model, processor, hf, t = tiny
    think, end, a, b, c, n = t["<think>"], t["</think>"], t["a"], t["b"], t["c"], len(t["nl"])
    script = [think] + [a] * 8 + [b, c, t["<|im_end|>"]]
    out = {}
    for budget in (3, 0, None):
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        out[budget] = generate(model, processor, "Q", max_tokens=20, thinking=True, thinking_budget=budget)
    # Three reasoning tokens, then </think> and the template's blank line forced, then the reply goes on.
    assert out[3] == hf.decode([think, a, a, a, end] + t["nl"] + [a] * (8 - 3 - 1 - n) + [b, c])
    assert split_reasoning(out[3]) == ("aaa", "a" * (8 - 3 - 1 - n) + "bc")
    assert split_reasoning(out[0]) == ("", "a" * (8 - 1 - n) + "bc")
    assert split_reasoning(out[None]) == ("a" * 8 + "bc", "")  # no budget: the block never closes


def test_budget_counts_per_row_in_a_batch_and_in_chat(tiny, monkeypatch):
    model, processor, hf, t = tiny
    think, a, b, stop = t["<think>"], t["a"], t["b"], t["<|im_end|>"]
    rows = [[think] + [a] * 5 + [b, stop], [b, think] + [a] * 5 + [b, stop]]  # row 1 opens the block a step later
    monkeypatch.setattr(SamplingOptions, "make", scripted(*rows))
    res = batch_generate(model, processor, ["Q1", "Q2"], max_tokens=len(rows[1]), thinking_budget=2)
    n = len(t["nl"])
    assert res.token_ids[0] == [think, a, a, t["</think>"]] + t["nl"] + [a] * (5 - 2 - 1 - n) + [b]
    assert res.token_ids[1] == [b, think, a, a, t["</think>"]] + t["nl"] + [a] * (5 - 2 - 1 - n) + [b]
    monkeypatch.setattr(SamplingOptions, "make", scripted([think] + [a] * 5 + [b, stop]))
    session = ChatSession(model, processor, thinking=True, thinking_budget=2, max_tokens=10)
    reply = session.ask("Q")
    assert split_reasoning(reply) == ("aa", "a" * (5 - 2 - 1 - n) + "b")
    assert session.history == [("Q", reply)] and reply.startswith("<think>")  # kept whole, as upstream


def test_budget_errors_are_clear(tiny, qwen3):
    model, processor, _, _ = tiny
    with pytest.raises(UserError, match="thinking_budget must be an integer >= 0"):
        generate(model, processor, "Q", thinking_budget=-1)
    tok, proc = qwen3
    assert ThinkingBudget.for_tokenizer(4, tok).forced == tok.encode("</think>\n\n")  # the template's close
    assert ThinkingBudget.for_tokenizer(4, proc.tokenizer).forced == tok.encode("</think>\n\n")
    qwen25 = load_tokenizer(ASSETS / "tokenizers" / "qwen2_5")  # Qwen2.5 (InternVL3): no <think> token
    with pytest.raises(UserError, match="one token each for <think> and </think>"):
        ThinkingBudget.for_tokenizer(4, qwen25)


def test_budget_when_the_prompt_opened_the_block():
    """The first call sees the whole context: a prompt ending inside <think> counts from there."""
    budget = ThinkingBudget(2, start_id=5, end_id=6, forced=[6, 7])
    logits = mx.zeros((1, 10))
    free = []
    for ctx in ([1, 5], [1, 5, 9], [1, 5, 9, 9], [1, 5, 9, 9, 6], [1, 5, 9, 9, 6, 7]):
        out = budget(mx.array(ctx), logits)
        free.append(int(mx.argmax(out, axis=-1).item()) if mx.isinf(out).any().item() else None)
    assert free == [None, None, 6, 7, None]  # two thinking tokens, then </think> and the blank line forced


# --- the server, through the real `openai` client -----------------------------------------------------------------

def test_server_reasoning_content_and_budget(tiny, build_case, monkeypatch):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from server_util import serving

    _, processor, hf, t = tiny
    think, a, b, c, stop = t["<think>"], t["a"], t["b"], t["c"], t["<|im_end|>"]
    script = [think] + [a] * 6 + [b, c, stop]
    with serving(build_case(CASE).original_dir, thinking=False) as (url, app):  # the server's default: off
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        ask = dict(model="tiny", messages=[{"role": "user", "content": "Q"}], max_tokens=20)
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        r = client.chat.completions.create(**ask, reasoning_effort="high", extra_body={"thinking_token_budget": 2})
        msg = r.choices[0].message
        n = len(t["nl"])
        assert (msg.reasoning_content, msg.content) == ("aa", "a" * (6 - 2 - 1 - n) + "bc")
        assert r.usage.prompt_tokens == len(processor.render("Q", thinking=True).ids)  # the card's prompt
        monkeypatch.setattr(SamplingOptions, "make", scripted([b, stop]))
        plain = client.chat.completions.create(**ask)  # says nothing: the server's default (off)
        assert plain.usage.prompt_tokens == len(processor.render("Q", thinking=False).ids)
        assert getattr(plain.choices[0].message, "reasoning_content", None) is None
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        chunks = list(client.chat.completions.create(**ask, stream=True, extra_body={
            "chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": 2}))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "aa"
        assert "".join(d.content or "" for d in deltas) == msg.content
        assert all("<think>" not in (d.content or "") for d in deltas)
        with pytest.raises(openai.BadRequestError, match="contradicts"):
            client.chat.completions.create(**ask, reasoning_effort="none",
                                           extra_body={"chat_template_kwargs": {"enable_thinking": True}})


def test_chat_page_folds_the_reasoning(tiny, build_case, monkeypatch, tmp_path):
    pytest.importorskip("fastapi")
    page = pytest.importorskip("cdp")  # the DevTools-protocol browser of the page tests
    if page.CHROMIUM is None:
        pytest.skip("no chromium on this machine")
    from server_util import serving

    _, processor, _, t = tiny
    monkeypatch.setattr(SamplingOptions, "make", scripted(
        [t["<think>"], t["a"], t["a"], t["</think>"], t["b"], t["c"], t["<|im_end|>"]]))
    with serving(build_case(CASE).original_dir) as (url, app):
        b = page.Browser(tmp_path)
        try:
            b.call("Page.enable")
            b.call("Page.navigate", url=url + "/")
            b.wait("document.getElementById('model').textContent === 'tiny'")
            b.js("document.getElementById('thinking').value = 'on'; 1")
            page.ask(b, "Q", 1)
            msg = f"{page.ASSISTANT}[0]"
            assert b.js(f"{msg}.querySelector('details.reasoning .text').textContent") == "aa"
            assert b.js(f"{msg}.querySelector('details.reasoning').open") is False  # folded
            assert b.js(f"{msg}.querySelector('.body').textContent") == "bc"
            # The page's switch reached the prompt: the card's thinking system prompt was rendered.
            assert app.state.engine.stats["prompt_tokens"] == len(processor.render("Q", thinking=True).ids)
        finally:
            b.close()


def test_cli_switches(tiny, build_case):
    import subprocess
    import sys

    model, processor, _, _ = tiny
    path = build_case(CASE).original_dir

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "mlx_internvl.cli.main", "generate", "--model", str(path),
                               "-p", "Q", "-m", "6", "--verbose", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc

    off = run("--no-thinking")
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n\n==========" in off.stderr  # the prompt, then the rule
    assert off.stdout.strip() == generate(model, processor, "Q", max_tokens=6, thinking=False)
    on = run("--thinking", "--seed", "3")  # the card's temperature 0.6 unless --temperature is given
    assert "rigorously follows this response protocol" in on.stderr
    assert on.stdout.strip() == generate(model, processor, "Q", max_tokens=6, thinking=True, seed=3)
    assert on.stdout.strip() != generate(model, processor, "Q", max_tokens=6, thinking=True, seed=3, temperature=0.0)
