"""Opt-in faster BLAS for MLX's Linux CPU backend.

The `mlx[cpu]` Linux wheel bundles the Netlib reference BLAS (`libblas.so.3`), which runs fp32 matmuls at a few
GFLOP/s. Loading an optimized BLAS such as OpenBLAS into the global symbol scope *before* `mlx.core` is imported makes
MLX's `cblas_sgemm` calls resolve to it (glibc searches the global scope before a library's own dependencies).
Set `MLX_INTERNVL_BLAS=openblas` (or a path to a BLAS shared library) to enable it; the effect and figures are in the
docs/benchmarks.md. It does nothing on macOS (MLX uses Accelerate/Metal there) or once mlx is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings


def preload_blas() -> str | None:
    choice = os.environ.get("MLX_INTERNVL_BLAS", "").strip()
    if not choice or not sys.platform.startswith("linux"):
        return None
    if "mlx.core" in sys.modules:
        warnings.warn("MLX_INTERNVL_BLAS is set but mlx was imported before mlx_internvl; it has no effect",
                      stacklevel=2)
        return None
    path = choice
    if choice == "openblas":
        name = ctypes.util.find_library("openblas")
        path = name or "libopenblas.so.0"
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        warnings.warn(f"MLX_INTERNVL_BLAS={choice!r}: cannot load {path} ({e}); using MLX's bundled BLAS",
                      stacklevel=2)
        return None
    return path


LOADED = preload_blas()
