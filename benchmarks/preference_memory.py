"""Peak memory and throughput of preference steps (DPO, MPO, ORPO) against SFT on the same rows, full-size 1B.

The model is the full-size InternVL2.5-1B architecture with seeded random weights (`mlx_internvl.bench.presets`),
LoRA rank 8 on every LLM linear layer. One pair is two rows (chosen, rejected: one 448 px tile = 256 image tokens,
32 text tokens before, 32 answer tokens each); SFT trains on the same two rows as a batch of two samples, so every
mode sees the same tokens. The preference modes use the training code itself: `pref_step.reference_logps` (the
model with its adapters switched off, no second copy of the weights) and the compiled `make_preference_step`.
Each mode runs in a fresh process; reported: MLX's peak allocation (weights included), the weight bytes, the peak
above the weights, and seconds per step after one warm-up (compiling) step, with the ratio to SFT of this run.

    python benchmarks/preference_memory.py                      # sft, dpo, mpo, orpo
    python benchmarks/preference_memory.py --modes sft,mpo --steps 1
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

preset, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
mx.random.seed(0)
model = random_model(preset, mx.float32)
apply_lora(model, LoraConfig(rank=8, alpha=16))
model.train()
weight_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
ctx = model.image_token_id
rng = np.random.default_rng(0)
prompt = np.concatenate([rng.integers(1000, 20000, 32), [ctx - 2], np.full(256, ctx), [ctx - 1]])
with tempfile.TemporaryDirectory() as tmp:
    png = Path(tmp) / "tile.png"
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(png)
    rows = []
    for _ in range(2):
        ids = np.concatenate([prompt, rng.integers(1000, 20000, 32)]).astype(np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[-32:] = True
        rows.append(Encoded(ids, mask, [str(png)], [1], 1, "bench"))
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


def run(preset: str, mode: str, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", CHILD, preset, mode, str(steps)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="internvl2_5-1b")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        p.error(f"modes are among {', '.join(MODES)}")
    print(f"{args.preset}, float32, LoRA r8 on the LLM: 2 rows of 1 tile + 32 text + 32 answer tokens "
          "(one pair; SFT: the same two rows)")
    print("| mode | peak MLX GB | weights GB | peak - weights GB | s/step | tokens/s | peak / SFT | s/step / SFT |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for mode in modes:
        r = results[mode] = run(args.preset, mode, args.steps)
        base = results.get("sft")
        ratio = (f"{r['peak_gb'] / base['peak_gb']:.2f} | {r['s_per_step'] / base['s_per_step']:.2f}" if base
                 else "- | -")
        print(f"| {mode} | {r['peak_gb']:.2f} | {r['weights_gb']:.2f} | {r['peak_gb'] - r['weights_gb']:.2f} | "
              f"{r['s_per_step']:.1f} | {r['tokens_per_s']:.0f} | {ratio} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
