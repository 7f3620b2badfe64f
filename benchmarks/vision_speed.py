"""ViT + pixel shuffle + mlp1 time per 448px tile on the full-size InternViT-300M, with and without `mx.compile`.

    python benchmarks/vision_speed.py --tiles 2 --repeats 3 [--dtype float32]

Variants alternate within each repeat; medians are reported.
"""

import argparse
import statistics
import time

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx

from mlx_internvl.bench.presets import random_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    model = random_model("internvl2_5-1b", getattr(mx, a.dtype))
    pv = mx.random.normal((a.tiles, 448, 448, 3))
    mx.eval(pv)
    variants = {"eager": model.extract_feature, "mx.compile": mx.compile(model.extract_feature)}
    ref = variants["eager"](pv)
    mx.eval(ref)
    times = {k: [] for k in variants}
    for fn in variants.values():
        mx.eval(fn(pv))  # warm-up (and compilation)
    for _ in range(a.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            out = fn(pv)
            mx.eval(out)
            times[name].append((time.perf_counter() - t) / a.tiles)
    diff = float(mx.abs(variants["mx.compile"](pv) - ref).max())
    for name, ts in times.items():
        print(f"{name:11s} {1e3 * statistics.median(ts):9.1f} ms/tile  ({mx.default_device()}, {a.dtype})")
    print(f"max |compiled - eager| = {diff:.2e}")


if __name__ == "__main__":
    main()
