"""What the prompt-cache weights identity costs on a full-size checkpoint, as ratios to loading the model.

Writes a full-size preset (random bf16 weights, the real shapes; default `internvl3-2b`, about 4.4 GB) as an MLX
directory, then in a fresh child process: loads it (`load_model`, weights evaluated), computes the identity with an
empty digest cache (every file hashed: "cold"), again with the cache filled ("warm": stat calls and the sampled
fingerprint only), and, for comparison, the old 64-samples-per-tensor fingerprint alone and a SHA-256 of every
tensor's bytes in memory (what an identity without cached file digests would cost on every load). The files are in
the page cache for the load and for the hashing alike (they were just written).

    python benchmarks/prompt_cache_identity.py --out benchmarks/results/prompt-cache-identity-linux-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, time
from mlx.utils import tree_flatten
from mlx_internvl.loading import load_model
from mlx_internvl import prompt_cache
os.environ["MLX_INTERNVL_CACHE"] = sys.argv[2]
t = time.perf_counter(); model, _ = load_model(sys.argv[1]); load = time.perf_counter() - t
t = time.perf_counter(); cold = prompt_cache.model_identity(model); t_cold = time.perf_counter() - t
t = time.perf_counter(); warm = prompt_cache.model_identity(model); t_warm = time.perf_counter() - t
assert cold == warm
base = tree_flatten(model.parameters())
t = time.perf_counter(); prompt_cache._sampled(base); t_sampled = time.perf_counter() - t
t = time.perf_counter(); prompt_cache._every_byte(base); t_memory = time.perf_counter() - t
print(json.dumps({"load_s": load, "identity_cold_s": t_cold, "identity_warm_s": t_warm,
                  "sampled_only_s": t_sampled, "every_byte_in_memory_s": t_memory,
                  "weight_bytes": sum(v.nbytes for _, v in base)}))
"""


def build(preset: str, out: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_internvl import files
    from mlx_internvl.bench.presets import preset_config
    from mlx_internvl.weights import build_model, save_mlx_model

    files.SHARD_BYTES = 1 << 30  # keeps the writer's peak memory at about 1 GB
    config = preset_config(preset)
    mx.random.seed(0)
    shapes = {k: v.shape for k, v in tree_flatten(build_model(config).parameters())}
    weights = {k: (0.02 * mx.random.normal(s)).astype(mx.bfloat16) for k, s in shapes.items()}
    save_mlx_model(weights, config, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-2b")
    ap.add_argument("--out", type=Path, help="write the results JSON here")
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoint (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model_dir, cache = Path(tmp) / "model", Path(tmp) / "digest-cache"
        build(args.preset, model_dir)
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        r = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(cache)], env=env, check=True,
                           capture_output=True, text=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
    result = dict(preset=args.preset, dtype="bfloat16", files=len(files), machine=platform.machine(),
                  system=platform.system(), cpus=os.cpu_count(), **{k: round(v, 3) if isinstance(v, float) else v
                                                                      for k, v in m.items()})
    for k in ("identity_cold_s", "identity_warm_s", "sampled_only_s", "every_byte_in_memory_s"):
        result[k.removesuffix("_s") + "_per_load"] = round(m[k] / m["load_s"], 4)
    result["command"] = "python benchmarks/prompt_cache_identity.py " + " ".join(sys.argv[1:])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
