"""Batched decoding is right per row for every backbone and every rope kind its configs can carry.

Each case is a tiny seeded checkpoint (transformers' own classes, `builders.py`) whose rope limit is small, so the
four rows of one batch sit below it, cross it while decoding, start on it and start above it. The rows are prefilled
one by one and decoded together through mlx-lm's `BatchGenerator` (per-row offsets in a `BatchKVCache`), as the
server and `batch_generate` do, two rows joining after the others have started. The reference for each row is that
row alone in transformers (its KV cache, its rope classes): every greedy token equal, every step's
log-probabilities within 1e-4.

Dynamic NTK and longrope choose their frequencies from the length the sequence has reached: a row must get those of
its own length, not those of the batch's longest row (which is what transformers does inside one batch).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from builders import ROPE_KINDS, Case, rope_case

torch = pytest.importorskip("torch")

from mlx_lm.generate import BatchGenerator  # noqa: E402

from mlx_internvl.loading import load_model  # noqa: E402
from mlx_internvl.reference import ReferenceModel  # noqa: E402

STEPS = 12
LOGPROB_TOL = 1e-4
LIMIT = 32  # the rope limit of every case (max_position_embeddings for dynamic, the original length otherwise)
CASES = [(text, kind) for text, kinds in ROPE_KINDS.items() for kind in kinds]


def make_case(text: str, kind: str) -> Case:
    return rope_case(f"rb_{text}_{kind}", text, kind, LIMIT)


def rows_around_limit(seed: int):
    """Four prompts: far below the limit, crossing it while decoding, starting on it, starting above it."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in (5, LIMIT - 6, LIMIT, LIMIT + 10)]


def decode_batched(model, rows, steps: int):
    """Greedy tokens and log-probabilities per row, decoded together: each row prefilled alone into its own cache,
    the first two joining the batch at once and the other two two steps later (continuous batching)."""
    gen = BatchGenerator(model, completion_batch_size=len(rows), prefill_batch_size=len(rows))
    out = {}

    def insert(group):
        caches = []
        for ids in group:
            cache = model.make_cache()
            for _ in model.prefill(ids[:-1], None, cache):
                pass
            caches.append(cache)
        uids = gen.insert([[ids[-1]] for ids in group], max_tokens=[steps] * len(group), caches=caches,
                          all_tokens=[ids[:-1] for ids in group])
        out.update({u: ([], []) for u in uids})
        return uids

    def step():
        for r in gen.next_generated():
            out[r.uid][0].append(r.token)
            out[r.uid][1].append(np.array(r.logprobs.astype(mx.float32)))

    try:
        uids = insert(rows[:2])
        step()
        step()
        uids += insert(rows[2:])
        while any(len(out[u][0]) < steps for u in uids):
            step()
    finally:
        gen.close()
    return [out[u] for u in uids]


def transformers_alone(reference: ReferenceModel, ids, steps: int):
    """One row greedily in transformers, with its KV cache: the prompt but its last token in one forward, then one
    token per step. That is how mlx-lm's `generate_step` and the batch feed a prompt, and it matters for dynamic
    NTK past the limit: the keys of each forward are rotated with the base of the length reached by then."""
    m = reference.model
    reference.reset_rope_state()
    tokens, logprobs = [], []
    with torch.no_grad():
        out = m(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
        token = torch.tensor([[ids[-1]]])
        for _ in range(steps):
            out = m(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            lp = torch.log_softmax(out.logits[0, -1].double(), -1)
            token = lp.argmax().view(1, 1)
            tokens.append(int(token))
            logprobs.append(lp.numpy())
    return tokens, np.stack(logprobs)


@pytest.mark.parametrize("text,kind", CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_each_batch_row_decodes_as_alone_in_transformers(build_case, text, kind):
    built = build_case(make_case(text, kind))
    model, _ = load_model(built.original_dir, dtype="float32")
    reference = ReferenceModel(built.model)
    rows = rows_around_limit(len(CASES) + len(text) + len(kind))
    batched = decode_batched(model, rows, STEPS)
    for i, (ids, (tokens, logprobs)) in enumerate(zip(rows, batched)):
        ref_tokens, ref_lp = transformers_alone(reference, ids, STEPS)
        assert tokens == ref_tokens, f"row {i} ({len(ids)} prompt tokens): tokens differ"
        err = np.abs(np.stack(logprobs) - ref_lp).max()
        assert err < LOGPROB_TOL, f"row {i} ({len(ids)} prompt tokens): log-probabilities {err:.2e} apart"


# Checkpoints of the kinds released configs carry, with prompts (about 55-250 tokens) around longrope's limit;
# dynamic NTK's limit is the context `generate` accepts, so its prompts stay below it.
CARRIED = [("qwen2", "dynamic"), ("internlm2", "dynamic"), ("phi3", "longrope")]


@pytest.mark.parametrize("text,kind", CARRIED, ids=[f"{t}-{k}" for t, k in CARRIED])
def test_batch_generate_equals_generate(build_case, text, kind):
    """`batch_generate` (text and images) gives each prompt the tokens `generate` gives it alone."""
    import mlx_internvl
    from mlx_internvl.generate import batch_generate, stream_generate
    from server_util import IMG1, IMG2

    built = build_case(rope_case(f"load_{text}_{kind}", text, kind, 512 if kind == "dynamic" else 200))
    model, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    prompts = ["Hi.", "What is in the image?", "Describe both of them in detail.", "Count to ten, slowly, in words."]
    images = [None, [IMG1], [IMG1, IMG2], None]
    batch = batch_generate(model, processor, prompts, images, max_tokens=16, max_tiles=2)
    lengths = []
    for prompt, ims, got in zip(prompts, images, batch.token_ids):
        pieces = list(stream_generate(model, processor, prompt, ims, max_tokens=16, max_tiles=2))
        alone = [p.token for p in pieces][: -1 if pieces[-1].finish_reason == "stop" else None]
        assert got == alone, f"{prompt!r}: batched tokens differ from the tokens alone"
        lengths.append(len(processor(prompt, images=ims, max_tiles=2)["input_ids"][0]))
    if kind == "longrope":
        assert min(lengths) <= 200 < max(lengths), lengths  # rows on both sides of the short/long switch
