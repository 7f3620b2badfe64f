"""Per-token decode cost of the VLM path vs plain mlx-lm on the same backbone and weights.

All sides run mlx-lm's `generate_step` for N tokens after the same prompt:
  - `vlm`:    `InternVLChatModel.__call__` with token ids only (what `mlx_internvl.generate` does per token);
  - `embeds`: the same model forced through the input-embeddings path on every step (the code path before the
              text-only fast path landed) — the "before" figure of that optimisation;
  - `mlx-lm`: the bare mlx-lm backbone.
The order of the sides rotates every repeat so that drift of the machine (thermal, other load) does not favour one
side; the median per-token time of each side is reported.

    python benchmarks/decode_overhead.py --preset internvl2_5-1b --dtype float32 --tokens 64 --repeats 6
    python benchmarks/decode_overhead.py --preset small --tokens 256 --repeats 9   # Python overhead exposed
"""

import argparse
import statistics
import time

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_internvl.bench.presets import random_model


class EmbeddingsPath:
    """Calls the VLM through `input_embeddings` on every step, as decoding did before the fast path."""

    def __init__(self, model):
        self.model = model
        self.layers = model.language_model.layers

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, ids, cache=None, **_):
        return self.model(ids, cache=cache, input_embeddings=self.model.embed_tokens(ids))


def per_token(model, ids, n):
    steps = generate_step(ids, model, max_tokens=n + 1)
    next(steps)
    t = time.perf_counter()
    k = sum(1 for _ in steps)
    return (time.perf_counter() - t) / k


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="internvl2_5-1b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=288)
    p.add_argument("--repeats", type=int, default=6)
    a = p.parse_args()
    if a.preset == "small":
        # A small backbone (hidden 256, 4 layers) where per-token Python overhead is not hidden by matmul time.
        from mlx_internvl.bench import presets

        presets.PRESETS["small"] = dict(presets.PRESETS["internvl2_5-1b"], llm=dict(
            presets.PRESETS["internvl2_5-1b"]["llm"], hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=512, vocab_size=4096))
    model = random_model(a.preset, getattr(mx, a.dtype))
    ids = mx.array([1000 + i % 3000 for i in range(a.prompt)], dtype=mx.int32)
    sides = {"vlm": model, "embeds": EmbeddingsPath(model), "mlx-lm": model.language_model}
    times = {k: [] for k in sides}
    for m in sides.values():
        per_token(m, ids, 4)  # warm-up
    names = list(sides)
    for r in range(a.repeats):
        for k in names[r % 3:] + names[: r % 3]:
            times[k].append(per_token(sides[k], ids, a.tokens))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.preset} {a.dtype} {mx.default_device()} prompt {a.prompt} tokens {a.tokens} repeats {a.repeats}")
    for k in names:
        print(f"  {k:7s} {1e3 * med[k]:8.2f} ms/token  {1 / med[k]:8.2f} tok/s  "
              f"time vs mlx-lm {med[k] / med['mlx-lm']:.4f}  (runs: {', '.join(f'{1e3 * t:.2f}' for t in times[k])})")


if __name__ == "__main__":
    main()
