"""Speculative decoding (mlx-lm's `speculative_generate_step` behind image prompts).

Greedy: the tokens equal plain greedy decoding of the target, token for token, for every backbone, with images,
with both draft kinds (another checkpoint; the target's own LLM quantized in memory), with a quantized target and
with a LoRA adapter. Plain greedy decoding is itself checked against transformers' `generate()` in
test_generate.py, so this is speculative == transformers by transitivity.

Sampled: a chi-square goodness-of-fit test of the first two sampled tokens against the target's exact joint
distribution (computed from the target's logits), for a draft whose own distribution is far from the target's;
the same test is shown to reject samples drawn from the draft's distribution, so it has the power to fail.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import ASSETS

import mlx_internvl
from builders import Case
from mlx_internvl.chat import ChatSession
from mlx_internvl.errors import UserError
from mlx_internvl.generate import stream_generate
from mlx_internvl.sampling import SamplingOptions
from mlx_internvl.speculative import Draft

IMG1, IMG2 = ASSETS / "images" / "image1.jpg", ASSETS / "images" / "chelsea.png"
# Same tokenizer as the targets (the builder's), different weights: a draft that is often wrong.
BACKBONES = {
    "qwen2": Case("smoke_qwen2"),
    "qwen3": Case("m_qwen3", text="qwen3"),
    "qwen3_moe": Case("m_qwen3_moe", text="qwen3_moe", seed=2),
    "llama": Case("m_llama", text="llama", template="Hermes-2"),
    "internlm2": Case("m_internlm2", text="internlm2", template="internlm2-chat"),
    "phi3": Case("gen_phi3", text="phi3", template="phi3-chat"),
}
OTHER_DRAFT = Case("spec_draft_qwen2", seed=7)


def load(build_case, case, **kw):
    return mlx_internvl.load(build_case(case).original_dir, dtype="float32", **kw)


def tokens(model, processor, draft=None, prompt="Describe the picture.", images=(IMG1,), max_tokens=20, **kw):
    pieces = list(stream_generate(model, processor, prompt, list(images), max_tokens=max_tokens, max_tiles=2,
                                  draft=draft, **kw))
    toks = [p.token for p in pieces]
    return toks[:-1] if pieces[-1].finish_reason == "stop" else toks


@pytest.mark.parametrize("name", list(BACKBONES))
def test_greedy_speculative_equals_plain_greedy_for_every_backbone(build_case, name):
    model, processor = load(build_case, BACKBONES[name])
    images = (IMG1,) if name != "phi3" else (IMG1, IMG2)  # Phi-3: past its 64-token rope switch, as in test_generate
    plain = tokens(model, processor, images=images)
    assert len(plain) >= 8
    self8 = Draft.self_draft(model, bits=8, group_size=32, num_draft_tokens=3)
    assert tokens(model, processor, self8, images=images) == plain
    # An 8-bit copy agrees with its target most of the time: the accepted path is exercised.
    assert self8.stats.accepted > 0 and self8.stats.target_passes < self8.stats.generated
    # The target as its own draft accepts everything; the draft cache then trails by one token each round.
    twin, twin_proc = load(build_case, BACKBONES[name])
    same = Draft.from_model(model, processor, twin, twin_proc, num_draft_tokens=4)
    assert tokens(model, processor, same, images=images) == plain
    assert same.stats.accepted >= same.stats.proposed - same.num_draft_tokens
    assert same.stats.target_passes <= same.stats.generated // 2


def test_greedy_with_another_checkpoint_as_draft(build_case):
    model, processor = load(build_case, BACKBONES["qwen2"])
    d_model, d_proc = load(build_case, OTHER_DRAFT)
    plain = tokens(model, processor, images=(IMG1, IMG2))
    for k in (1, 2, 5):
        draft = Draft.from_model(model, processor, d_model, d_proc, num_draft_tokens=k)
        assert tokens(model, processor, draft, images=(IMG1, IMG2)) == plain
        # A draft with other weights is mostly rejected: one target pass per token or nearly.
        assert draft.stats.generated == len(plain) or draft.stats.generated == len(plain) + 1
        assert draft.stats.target_passes >= draft.stats.generated - draft.stats.accepted


def test_greedy_with_a_4bit_self_draft_and_text_only(build_case):
    model, processor = load(build_case, BACKBONES["qwen2"])
    plain = tokens(model, processor, images=())
    draft = Draft.self_draft(model, bits=4, group_size=32)
    assert tokens(model, processor, draft, images=()) == plain


def test_greedy_with_a_quantized_target(build_case):
    from mlx_internvl.weights import quantize

    model, processor = load(build_case, BACKBONES["qwen2"])
    model.config.quantization = quantize(model, 8, 32)
    mx.eval(model.parameters())
    plain = tokens(model, processor)
    assert tokens(model, processor, Draft.self_draft(model, bits=4, group_size=32)) == plain
    d_model, d_proc = load(build_case, OTHER_DRAFT)
    assert tokens(model, processor, Draft.from_model(model, processor, d_model, d_proc)) == plain
    with pytest.raises(UserError, match="already quantized to 8 bits"):
        Draft.self_draft(model, bits=8)


def test_greedy_with_a_lora_adapter(build_case):
    from mlx_internvl.adapters import LoraConfig, apply_lora

    model, processor = load(build_case, BACKBONES["qwen2"])
    before = tokens(model, processor)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    # Non-zero B factors (a fresh adapter is the identity), large enough to change the reply.
    mx.random.seed(3)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.3 * mx.random.normal(m.lora_b.shape)
    mx.eval(model.parameters())
    plain = tokens(model, processor)
    assert plain != before
    self8 = Draft.self_draft(model, bits=8, group_size=32)
    assert tokens(model, processor, self8) == plain
    assert self8.stats.accepted > 0  # the draft carries the fused adapter, so it agrees with the adapted target
    d_model, d_proc = load(build_case, OTHER_DRAFT)
    assert tokens(model, processor, Draft.from_model(model, processor, d_model, d_proc)) == plain


def test_chat_session_with_a_draft_equals_plain_chat(build_case):
    model, processor = load(build_case, BACKBONES["qwen2"])
    d_model, d_proc = load(build_case, OTHER_DRAFT)
    turns = [("What is in the image?", [IMG1]), ("And in this one?", [IMG2]), ("Thanks.", [])]
    plain = ChatSession(model, processor, max_tiles=2, max_tokens=12)
    answers = [plain.ask(q, images=i) for q, i in turns]
    for draft in (Draft.self_draft(model, bits=8, group_size=32),
                  Draft.from_model(model, processor, d_model, d_proc, num_draft_tokens=2)):
        s = ChatSession(model, processor, max_tiles=2, max_tokens=12, draft=draft)
        assert [s.ask(q, images=i) for q, i in turns] == answers
        assert s.history == plain.history
        # Both caches hold the same tokens after every turn.
        t, d = draft.split(model, s._cache)
        assert t[0].offset == d[0].offset == len(s._cache_ids)


def test_vocabulary_mismatch_is_a_user_error(build_case, tmp_path):
    import shutil

    from mlx_internvl.speculative import load_draft

    model, processor = load(build_case, BACKBONES["qwen2"])
    # A copy of the draft checkpoint whose tokenizer has one token renamed (a byte token no merge uses).
    src = build_case(OTHER_DRAFT).original_dir
    bad = tmp_path / "draft"
    shutil.copytree(src, bad)
    import json

    tj = json.loads((bad / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    key = next(k for k, v in sorted(vocab.items(), key=lambda kv: kv[1]) if v >= 100 and k not in "Ġthein a")
    vocab["zzzz"] = vocab.pop(key)
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UserError, match="different tokenizer vocabulary"):
        load_draft(model, processor, str(bad))
    with pytest.raises(UserError, match="either --draft-model or --draft-quantize"):
        load_draft(model, processor, str(src), draft_quantize=4)
    with pytest.raises(UserError, match="4 or 8"):
        Draft.self_draft(model, bits=3)
    with pytest.raises(UserError, match="plain KV cache"):
        tokens(model, processor, Draft.self_draft(model, bits=8, group_size=32), max_kv_size=512)


# -- sampling ---------------------------------------------------------------------------------------------------

TEMP = 1.0
N_SAMPLES = 1000
SHARPEN = 2.5


def _target_joint(model, ids, temp):
    """Exact p(x1, x2 | prompt) of the target at temperature `temp`, as a dict over (x1, x2) with mass > 1e-6."""
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    p1 = np.array(mx.softmax(logits / temp))
    joint = {}
    top = np.argsort(-p1)
    kept = top[np.cumsum(p1[top]) <= 1 - 1e-7][:200]
    batch = mx.array([ids + [int(x)] for x in kept])
    p2 = np.array(mx.softmax(model(batch)[:, -1].astype(mx.float32) / temp, axis=-1))
    for row, x1 in enumerate(kept):
        for x2 in np.nonzero(p1[x1] * p2[row] > 1e-6)[0]:
            joint[(int(x1), int(x2))] = float(p1[x1] * p2[row, x2])
    return joint


def _chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """Pearson chi-square p-value with categories of expected count < 5 pooled into one."""
    import torch

    keys = sorted(probs, key=lambda k: -probs[k])
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for k in keys:
        if probs[k] * n >= 5:
            obs.append(counts.get(k, 0))
            exp.append(probs[k] * n)
        else:
            rest_o += counts.get(k, 0)
            rest_e += probs[k] * n
    rest_o += sum(v for k, v in counts.items() if k not in probs)
    rest_e += max(n - sum(exp) - rest_e, 0.0)
    obs.append(rest_o)
    exp.append(max(rest_e, 1e-9))
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    # chi2.sf(stat, dof) = Q(dof / 2, stat / 2), the regularised upper incomplete gamma function.
    dof = len(obs) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return float(p), len(obs)


def test_sampled_speculative_tokens_follow_the_target_distribution(build_case):
    """1000 two-token samples at temperature 1; a chi-square test at level 1e-3 against the target's exact joint
    distribution of (token 1, token 2) must not reject. The draft is the target with its output layer scaled by 2.5
    (same greedy choice, a much sharper distribution: total-variation distance > 0.4 from the target's), so drafts
    are accepted about half the time and both paths of the rule run; the same test rejects samples drawn from the
    draft's distribution, so it has the power to fail."""
    model, processor = load(build_case, BACKBONES["qwen2"])
    d_model, d_proc = load(build_case, BACKBONES["qwen2"])
    d_model.language_model.lm_head.weight = model.language_model.lm_head.weight * SHARPEN
    ids = processor.tokenizer.encode("Say")
    target = _target_joint(model, ids, TEMP)
    drafted = _target_joint(d_model, ids, TEMP)
    tv = 0.5 * sum(abs(target.get(k, 0) - drafted.get(k, 0)) for k in set(target) | set(drafted))
    assert tv > 0.4, tv

    draft = Draft.from_model(model, processor, d_model, d_proc, num_draft_tokens=2)
    sampler, _ = SamplingOptions(temperature=TEMP, seed=1234).make()
    counts = {}
    for _ in range(N_SAMPLES):
        out = [t for t, *_ in draft.generate_step(model, ids, None, None, max_tokens=2, sampler=sampler)]
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    p, bins = _chi_square_p(counts, target, N_SAMPLES)
    assert bins >= 10, bins  # enough categories for the test to mean something
    assert p > 1e-3, (p, bins)
    # Power: samples of the draft's distribution are rejected by the same test.
    rng = np.random.default_rng(0)
    keys = list(drafted)
    probs = np.array([drafted[k] for k in keys])
    draws = rng.choice(len(keys), size=N_SAMPLES, p=probs / probs.sum())
    fake = {}
    for i in draws:
        fake[keys[i]] = fake.get(keys[i], 0) + 1
    assert _chi_square_p(fake, target, N_SAMPLES)[0] < 1e-6
    # Both paths of the rule ran: draft tokens were accepted and rejected.
    assert 0.2 < draft.total.acceptance_rate < 0.9, draft.total.summary()
