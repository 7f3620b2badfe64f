"""fp32 matmul GFLOP/s of MLX on this machine, with MLX's bundled BLAS or with the one `MLX_INTERNVL_BLAS` preloads.

    python benchmarks/matmul_blas.py                              # the Linux wheel's bundled reference BLAS
    MLX_INTERNVL_BLAS=openblas python benchmarks/matmul_blas.py   # Debian/Ubuntu: apt-get install libopenblas0-pthread

Also prints the largest difference from numpy's float64 product, so the two runs can be seen to compute the same.
"""

import argparse
import time

import mlx_internvl._blas as blas  # must precede mlx

# isort: split
import mlx.core as mx
import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((a.n, a.n)).astype(np.float32) for _ in range(2))
    mx_x, mx_y = mx.array(x), mx.array(y)
    mx.eval(mx_x @ mx_y)
    best = float("inf")
    for _ in range(a.repeats):
        t = time.perf_counter()
        z = mx_x @ mx_y
        mx.eval(z)
        best = min(best, time.perf_counter() - t)
    err = np.abs(np.array(z) - x.astype(np.float64) @ y.astype(np.float64)).max()
    print(f"BLAS preload: {blas.LOADED or 'none (bundled)'}; {mx.default_device()} fp32 {a.n}x{a.n}x{a.n}: "
          f"{2 * a.n ** 3 / best / 1e9:.1f} GFLOP/s; max |mlx - numpy float64| = {err:.2e}")


if __name__ == "__main__":
    main()
