"""Peak memory and throughput of preference steps (DPO, MPO, ORPO) against SFT on the same rows, full-size 1B.

The model is the full-size InternVL2.5-1B architecture with seeded random weights (`mlx_internvl.bench.presets`),
LoRA rank 8 on every LLM linear layer. One pair is two rows (chosen, rejected: one 448 px tile = 256 image tokens,
32 text tokens before, 32 answer tokens each); SFT trains on the same two rows as a batch of two samples, so every
mode sees the same tokens. The preference modes use the training code itself: `pref_step.reference_logps` (the
model with its adapters switched off, no second copy of the weights) and the compiled `make_preference_step`.
Each mode runs in a fresh process; reported: MLX's peak allocation (weights included), the weight bytes, the peak
above the weights, and seconds per step after one warm-up (compiling) step, with the ratio to SFT of this run.

`--no-image` drops the tile (rows of 32 + 32 text tokens; the ViT's weights are loaded but not run), which
brings a run on a slow shared CPU from hours down to minutes; the weights and the reference's share of the peak
are the same question either way.

    python benchmarks/preference_memory.py                      # sft, dpo, mpo, orpo
    python benchmarks/preference_memory.py --modes sft,mpo --steps 1 --no-image
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MODES = ("sft", "dpo", "mpo", "orpo")

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
import mlx_internvl
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image
from mlx_internvl.bench.presets import random_model
from mlx_internvl.adapters import LoraConfig, apply_lora
from mlx_internvl.lora.batching import collate
from mlx_internvl.lora.render import Encoded
from mlx_internvl.lora.trainer import TrainingArgs, make_optimizer, make_step, training_logits
from mlx_internvl.lora.pref_step import init_preference_state, make_preference_step, reference_logps
from mlx_internvl.lora.preference import PreferenceConfig

preset, mode, steps, tiles = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mx.random.seed(0)
model = random_model(preset, mx.float32)
apply_lora(model, LoraConfig(rank=8, alpha=16))
model.train()
weight_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
ctx = model.image_token_id
rng = np.random.default_rng(0)
image = [[ctx - 2], np.full(256, ctx), [ctx - 1]] if tiles else []
prompt = np.concatenate([rng.integers(1000, 20000, 32), *image])
with tempfile.TemporaryDirectory() as tmp:
    png = Path(tmp) / "tile.png"
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(png)
    rows = []
    for _ in range(2):
        ids = np.concatenate([prompt, rng.integers(1000, 20000, 32)]).astype(np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[-32:] = True
        rows.append(Encoded(ids, mask, [str(png)] if tiles else [], [1] if tiles else [], 1, "bench"))
    batch, n_tokens = collate(rows, model.config, 0, ctx)
optimizer = make_optimizer(TrainingArgs(lr=1e-5), steps + 1)
if mode == "sft":
    step, state = make_step(model, optimizer, frozen_features=True, compile=True)
    run = lambda: step(batch, None, True, mx.array(1.0 / 64))[0]
else:
    cfg = PreferenceConfig.make(mode)
    init_preference_state(cfg, optimizer)
    step, state = make_preference_step(model, optimizer, cfg, training_logits, True, True)
    def run():
        ref = None if mode == "orpo" else reference_logps(model, batch, training_logits, True)
        return step(batch, ref, None, True, mx.array(1.0))[0]
times = []
mx.reset_peak_memory()
for i in range(steps + 1):
    t = time.perf_counter()
    loss = run()
    mx.eval(state, loss)
    times.append(time.perf_counter() - t)
timed = times[1:]
print(json.dumps({"peak_gb": mx.get_peak_memory() / 1e9, "weights_gb": weight_gb, "tokens": n_tokens,
                  "s_per_step": sum(timed) / len(timed), "tokens_per_s": n_tokens * len(timed) / sum(timed)}))
"""


def run(preset: str, mode: str, steps: int, tiles: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", CHILD, preset, mode, str(steps), str(tiles)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


HEAD = ("| mode (one pair = 2 rows of {rows}) | peak MLX GB | weights GB | peak above weights GB "
        "| above weights / SFT's | s/step | tokens/s |")


def markdown(data: dict) -> str:
    """The table of a results file: peak memory, the part of it above the weights (what a second copy of the
    weights would add to), and throughput, each mode against SFT of the same run."""
    res = data["results"]
    rows_are = "1 tile + 32 text + 32 answer tokens" if data.get("tiles", 1) else "32 text + 32 answer tokens"
    base = res.get("sft")
    rows = [HEAD.format(rows=rows_are), "|---|---|---|---|---|---|---|"]
    for mode, r in res.items():
        above = r["peak_gb"] - r["weights_gb"]
        ratio = f"{above / (base['peak_gb'] - base['weights_gb']):.2f}" if base else "-"
        rows.append(f"| {mode} | {r['peak_gb']:.2f} | {r['weights_gb']:.2f} | {above:.2f} | {ratio} | "
                    f"{r['s_per_step']:.0f} | {r['tokens_per_s']:.1f} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="internvl2_5-1b")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--no-image", action="store_true",
                   help="text-only rows (32 + 32 tokens; the ViT's weights are loaded but not run): minutes, not "
                        "hours, on a slow CPU")
    p.add_argument("--json", type=Path, default=None, help="also write the results here (after each mode)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        p.error(f"modes are among {', '.join(MODES)}")
    data = {"preset": args.preset, "steps": args.steps, "dtype": "float32", "lora_rank": 8,
            "tiles": 0 if args.no_image else 1,
            "blas": os.environ.get("MLX_INTERNVL_BLAS") or "default",
            "command": "python benchmarks/preference_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "results": {}}
    for mode in modes:
        data["results"][mode] = run(args.preset, mode, args.steps, 0 if args.no_image else 1)
        if args.json:  # after each mode, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"{mode}: {data['results'][mode]}", flush=True)
    print(markdown(data))


if __name__ == "__main__":
    main()
