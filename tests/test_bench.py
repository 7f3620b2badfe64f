"""The benchmark machinery end to end on a miniature preset (full-size presets take minutes; see docs/benchmarks.md)."""

import json
import subprocess
import sys

import pytest

from mlx_internvl.bench import presets
from mlx_internvl.bench.run import markdown

TINY = dict(
    vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=448,
                patch_size=14, norm_type="layer_norm", layer_norm_eps=1e-6, qkv_bias=True, qk_normalization=False),
    llm=dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=1024, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
             tie_word_embeddings=False),
    arch="Qwen2ForCausalLM", image_token_id=1000, note="test only")

SCRIPT = """
import json, sys
import mlx_internvl
from mlx_internvl.bench import presets, measure
presets.PRESETS["tiny"] = json.loads(sys.argv[2])
r = (measure.run_mlx if sys.argv[1] == "mlx" else measure.run_torch)("tiny", "float32", tiles=(1, 2), decode_tokens=4)
print("RESULT " + json.dumps(r))
"""


@pytest.mark.parametrize("side", ["mlx", "torch"])
def test_measure_runs_and_reports_every_figure(side):
    out = subprocess.run([sys.executable, "-c", SCRIPT, side, json.dumps(TINY)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for key in ("load_s", "vision_ms_per_tile", "decode_tps", "peak_rss_gb"):
        assert r[key] > 0
    assert set(r["ttft_s"]) == {"1", "2"} and r["ttft_s"]["2"] > 0
    if side == "mlx":
        assert r["plain_decode_tps"] > 0 and r["peak_memory_gb"] > 0 and 0 < r["decode_bw_fraction"]
    table = markdown([r], (1, 2))
    assert "| tiny | float32 | " + side in table


def test_presets_have_the_released_shapes():
    # Parameter counts of the real models (spec §6): InternVL2.5-1B is 0.94 B, InternVL3.5-1B ~1.06 B.
    from mlx.utils import tree_flatten

    from mlx_internvl.weights import build_model

    counts = {}
    for name in ("internvl2_5-1b", "internvl3_5-1b"):
        model = build_model(presets.preset_config(name))
        counts[name] = sum(v.size for _, v in tree_flatten(model.parameters())) / 1e9
    assert 0.92 < counts["internvl2_5-1b"] < 0.96
    assert 1.0 < counts["internvl3_5-1b"] < 1.1
