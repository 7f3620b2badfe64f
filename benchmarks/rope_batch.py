"""Cost of per-row rope in batched decoding: a dynamic-NTK model against the same weights with plain rope.

Batched decode steps hand each rope module an array of per-row offsets. Dynamic NTK (InternVL3's Qwen2.5) then
rotates with per-row frequencies computed in float32 (`mlx_internvl.rope.rope_rows`), where a plain rope is one
`mx.fast.rope` call. Both sides decode the same batch of prompts of different lengths, all below
`max_position_embeddings`, so both compute the same tokens (checked); the figure is the ratio of their median time
per decode step. The order of the sides rotates every repeat.

    python benchmarks/rope_batch.py                                  # small backbone: rope's share is largest
    python benchmarks/rope_batch.py --preset internvl3-1b --batch 8 --tokens 32 --repeats 5
"""

import argparse
import statistics
import time

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator

from mlx_internvl.bench import presets
from mlx_internvl.bench.presets import random_model
from mlx_internvl.rope import DynamicNTKRoPE


def rope_sides(model) -> dict:
    """{side: function that gives every layer that side's rope}: the model's dynamic ropes, or plain ones of the
    same base."""
    layers = model.language_model.model.layers
    dynamic = [layer.self_attn.rope for layer in layers]
    assert all(isinstance(r, DynamicNTKRoPE) for r in dynamic), "the preset must use dynamic NTK rope"
    plain = [nn.RoPE(r.dims, traditional=r.traditional, base=r.base) for r in dynamic]

    def use(ropes):
        def apply():
            for layer, r in zip(layers, ropes):
                layer.self_attn.rope = r
        return apply
    return {"plain": use(plain), "dynamic": use(dynamic)}


def decode(model, prompts, steps: int):
    """(seconds per decode step, tokens) of one batch: each prompt prefilled alone, then decoded together."""
    caches = []
    for ids in prompts:
        cache = model.make_cache()
        for _ in model.prefill(ids[:-1], None, cache):
            pass
        caches.append(cache)
    gen = BatchGenerator(model, completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    uids = gen.insert([[p[-1]] for p in prompts], max_tokens=[steps + 1] * len(prompts), caches=caches)
    tokens = {u: [] for u in uids}
    try:
        for r in gen.next_generated():  # the first step also merges the caches: not timed
            tokens[r.uid].append(r.token)
        t, n = time.perf_counter(), 0
        while responses := gen.next_generated():
            n += 1
            for r in responses:
                tokens[r.uid].append(r.token)
        return (time.perf_counter() - t) / n, [tokens[u] for u in uids]
    finally:
        gen.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.preset == "small":
        # A small backbone (hidden 256, 4 layers) where rope is a larger share of a step than in a real model.
        base = presets.PRESETS["internvl3-1b"]
        presets.PRESETS["small"] = dict(base, llm=dict(
            base["llm"], hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512, vocab_size=4096))
    model = random_model(a.preset, getattr(mx, a.dtype))
    prompts = [[100 + (7 * i + j) % 3000 for j in range(8 + 5 * i)] for i in range(a.batch)]
    sides = rope_sides(model)
    times, outputs = {k: [] for k in sides}, {}
    for r in range(a.repeats):
        for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            sides[k]()
            t, outputs[k] = decode(model, prompts, a.tokens)
            times[k].append(t)
    assert outputs["plain"] == outputs["dynamic"], "below max_position_embeddings both ropes must give the same tokens"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.preset} {a.dtype} {mx.default_device()} batch {a.batch} tokens {a.tokens} repeats {a.repeats}")
    for k in sides:
        print(f"  {k:8s} {1e3 * med[k]:8.2f} ms/step  time vs plain {med[k] / med['plain']:.3f}  "
              f"(runs: {', '.join(f'{1e3 * t:.2f}' for t in times[k])})")


if __name__ == "__main__":
    main()
