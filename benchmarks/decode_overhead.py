"""Per-token decode cost of the VLM path vs plain mlx-lm on the same backbone and weights.

Both run mlx-lm's `generate_step` for N tokens after the same prompt length; the VLM side goes through
`InternVLChatModel.__call__` (what `mlx_internvl.generate` uses), the plain side calls the bare mlx-lm model.
Runs are interleaved and repeated; the median per-token time of each side is reported.

    python benchmarks/decode_overhead.py --preset internvl2_5-1b --dtype float32 --tokens 64 --repeats 5
"""

import argparse
import statistics
import time

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)
import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_internvl.bench.presets import random_model


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
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if a.preset == "small":
        # A small backbone (hidden 256, 4 layers) where per-token Python overhead is not hidden by matmul time.
        from mlx_internvl.bench import presets

        presets.PRESETS["small"] = dict(presets.PRESETS["internvl2_5-1b"], llm=dict(
            presets.PRESETS["internvl2_5-1b"]["llm"], hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=512, vocab_size=4096))
    model = random_model(a.preset, getattr(mx, a.dtype))
    ids = mx.array([1000 + i % 3000 for i in range(a.prompt)], dtype=mx.int32)
    vlm, plain = [], []
    per_token(model, ids, 4)
    for _ in range(a.repeats):
        vlm.append(per_token(model, ids, a.tokens))
        plain.append(per_token(model.language_model, ids, a.tokens))
    mv, mp = statistics.median(vlm), statistics.median(plain)
    print(f"{a.preset} {a.dtype} {mx.default_device()}: VLM {1e3 * mv:.2f} ms/token ({1 / mv:.2f} tok/s), "
          f"mlx-lm {1e3 * mp:.2f} ms/token ({1 / mp:.2f} tok/s), VLM/mlx-lm time {mv / mp:.4f}")


if __name__ == "__main__":
    main()
