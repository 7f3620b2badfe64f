"""The opt-in BLAS preload (`MLX_INTERNVL_BLAS`) computes what MLX's bundled BLAS computes, and fails soft."""

import ctypes.util
import os
import subprocess
import sys

import pytest

PROBE = """
import mlx_internvl._blas as b
import mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
x, y = (rng.standard_normal((200, 300)).astype(np.float32), rng.standard_normal((300, 100)).astype(np.float32))
z = np.array(mx.array(x) @ mx.array(y))
print(b.LOADED, float(np.abs(z - x.astype(np.float64) @ y.astype(np.float64)).max()))
"""


def probe(value):
    env = dict(os.environ, MLX_INTERNVL_BLAS=value)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    loaded, err = out.stdout.split()
    return loaded, float(err), out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload only exists for MLX's Linux CPU backend")
@pytest.mark.skipif(ctypes.util.find_library("openblas") is None
                    and not os.path.exists("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"),
                    reason="no OpenBLAS on this machine (apt-get install libopenblas0-pthread)")
def test_openblas_preload_matches_float64():
    loaded, err, _ = probe("openblas")
    assert loaded != "None"
    assert err < 1e-4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload only exists for MLX's Linux CPU backend")
def test_unloadable_blas_warns_and_falls_back():
    loaded, err, stderr = probe("/no/such/libblas.so")
    assert loaded == "None" and err < 1e-4
    assert "cannot load /no/such/libblas.so" in stderr
