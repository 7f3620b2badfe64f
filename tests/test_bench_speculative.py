"""benchmarks/speculative.py end to end on a miniature preset with the real vocabulary size (the full-size presets
take minutes per figure; docs/benchmarks.md): every part runs, the speculative runs produce the plain greedy tokens (the
script asserts it), and the table has every figure."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINI = dict(
    vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=448,
                patch_size=14, norm_type="layer_norm", layer_norm_eps=1e-6, qkv_bias=True, qk_normalization=False),
    llm=dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=128, vocab_size=151674, rms_norm_eps=1e-6, rope_theta=1e6,
             max_position_embeddings=8192, tie_word_embeddings=False),
    arch="Qwen2ForCausalLM", image_token_id=151667, note="test only")

SCRIPT = """
import json, runpy, sys
import mlx_internvl
from mlx_internvl.bench import presets
presets.PRESETS["mini"] = json.loads(sys.argv[1])
presets.PRESETS["mini2"] = json.loads(sys.argv[1])
script = sys.argv[3]
sys.argv = ["speculative.py", "--target", "mini", "--pair", "mini2:mini", "--cache-preset", "mini", "--tokens", "6",
            "--max-tiles", "2", "--self-prompt", "image", "--json", sys.argv[2]]
runpy.run_path(script, run_name="__main__")
"""


def test_speculative_benchmark_runs_every_part(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(MINI), str(out),
                           str(ROOT / "benchmarks" / "speculative.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    kinds = [r["draft"] for r in res["drafts"]]
    assert kinds == ["none", "self-draft 4-bit", "self-draft 8-bit", "none", "mini draft (fp32)"]
    for r in res["drafts"][1:3] + res["drafts"][4:]:
        assert 0 <= r["acceptance"] <= 1 and 0 < r["passes_per_token"] <= 1 and r["mac_model_speedup"] > 0
        assert r["generated"] == 7 and r["accepted"] <= r["proposed"]
    c = res["cache"]
    assert c["new_tokens_cached"] < c["prompt_tokens"] and c["tiles"] == 1
    assert "| mini fp32 | self-draft 4-bit, k=3 |" in proc.stdout and "TTFT from the file" in proc.stdout
