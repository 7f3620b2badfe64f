"""Peak memory and throughput of LoRA / QLoRA training steps on the full-size InternVL2.5-1B architecture.

The model has the real shapes (ViT-300M 1024/24/16/4096 at 448 px + Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocab 151674) with seeded random weights (`mlx_internvl.bench.presets`), so nothing
is downloaded. Each configuration runs in a fresh process so its peak belongs to it alone, and uses the training
code itself: `apply_lora`, the batch `collate` (a real 448x448 PNG through tiling and normalisation), and the
compiled step of `make_step` (forward, masked cross-entropy, backward, AdamW).

The sample is one tile (256 image tokens) between 32 text tokens before and 32 answer tokens after (324 tokens,
padded to 352 for the step as in training). Reported: MLX's peak allocation (`mx.get_peak_memory`, weights
included), the process's peak RSS, weight bytes, seconds per step and tokens/s over the timed steps (after one
warm-up step that also compiles).

    MLX_INTERNVL_BLAS=openblas python benchmarks/lora_memory.py            # all configurations
    python benchmarks/lora_memory.py --configs lora-r8-bf16,qlora4-r8-bf16 # what a Mac user would run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# name -> (base dtype, quantization bits or None, LoRA rank, gradient checkpointing)
CONFIGS = {
    "lora-r8-fp32": ("float32", None, 8, False),
    "lora-r2-fp32": ("float32", None, 2, False),
    "lora-r8-fp32-gc": ("float32", None, 8, True),
    "qlora4-r8-fp32": ("float32", 4, 8, False),
    "qlora8-r8-fp32": ("float32", 8, 8, False),
    "lora-r8-bf16": ("bfloat16", None, 8, False),
    "lora-r2-bf16": ("bfloat16", None, 2, False),
    "qlora4-r8-bf16": ("bfloat16", 4, 8, False),
}
TEXT_BEFORE, ANSWER = 32, 32

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import mlx_internvl  # before mlx: lets MLX_INTERNVL_BLAS preload an optimized BLAS on Linux
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image
from mlx_internvl.bench.presets import PRESETS, random_model
from mlx_internvl.adapters import LoraConfig, apply_lora, trainable_weights
from mlx_internvl.weights import quantize
from mlx_internvl.lora.batching import collate
from mlx_internvl.lora.render import Encoded
from mlx_internvl.lora.checkpointing import grad_checkpointing
from mlx_internvl.lora.trainer import TrainingArgs, make_optimizer, make_step

preset, dtype, bits, rank, gc, steps, before, answer = sys.argv[1:9]
bits = None if bits == "none" else int(bits)
rank, gc, steps, before, answer = int(rank), gc == "1", int(steps), int(before), int(answer)
mx.random.seed(0)
model = random_model(preset, getattr(mx, dtype))
if bits:
    model.config.quantization = quantize(model, bits, 64)
apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank))
model.train()
weight_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
trainable = sum(v.size for v in trainable_weights(model).values())
ctx = model.image_token_id
rng = np.random.default_rng(0)
ids = np.concatenate([rng.integers(1000, 20000, before), [ctx - 2], np.full(256, ctx), [ctx - 1],
                      rng.integers(1000, 20000, answer)]).astype(np.int32)
mask = np.zeros(len(ids), dtype=bool)
mask[-answer:] = True
with tempfile.TemporaryDirectory() as tmp:
    png = Path(tmp) / "tile.png"
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(png)
    sample = Encoded(ids, mask, [str(png)], [1], 1, "bench")
    batch, n_tokens = collate([sample], model.config, 0, ctx)
optimizer = make_optimizer(TrainingArgs(lr=1e-5), steps + 1)
step, state = make_step(model, optimizer, frozen_features=True, compile=True)
scale = mx.array(1.0 / answer)
layer_types = {type(model.language_model.layers[0])} if gc else ()
times = []
mx.reset_peak_memory()
with grad_checkpointing(layer_types):
    for i in range(steps + 1):
        t = time.perf_counter()
        ce, _, _ = step(batch, None, True, scale)
        mx.eval(state, ce)
        times.append(time.perf_counter() - t)
timed = times[1:]
rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"peak_gb": mx.get_peak_memory() / 1e9,
                  "rss_gb": rss_bytes / 1e9,  # ru_maxrss is bytes on macOS, KiB on Linux
                  "weights_gb": weight_gb, "trainable_m": trainable / 1e6, "tokens": n_tokens,
                  "padded": int(batch["ids"].shape[1]), "s_per_step": sum(timed) / len(timed),
                  "tokens_per_s": n_tokens * len(timed) / sum(timed), "warmup_s": times[0],
                  "loss": float(ce.item()) / answer}))
"""


def run(preset: str, name: str, steps: int) -> dict:
    dtype, bits, rank, gc = CONFIGS[name]
    argv = [preset, dtype, "none" if bits is None else str(bits), str(rank), "1" if gc else "0", str(steps),
            str(TEXT_BEFORE), str(ANSWER)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])

# the docs' rows, in order: config -> label; the bf16 rows are what a Mac trains, so they come first and in bold
LABELS = {
    "lora-r2-bf16": "LoRA, bf16 base (what a Mac runs)", "lora-r8-bf16": "LoRA, bf16 base",
    "qlora4-r8-bf16": "QLoRA, 4-bit LLM, bf16 ViT", "lora-r2-fp32": "LoRA, fp32 base",
    "lora-r8-fp32": "LoRA, fp32 base",
    "lora-r8-fp32-gc": "LoRA, fp32 base, gradient checkpointing", "qlora4-r8-fp32": "QLoRA, 4-bit LLM, fp32 ViT",
    "qlora8-r8-fp32": "QLoRA, 8-bit LLM, fp32 ViT",
}
PUBLISHED = "| *PyTorch on Apple MPS, rank-2 LoRA (published, see below)* | | 2 | | *22 GB* | | | | |"


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def markdown(data: dict) -> str:
    """The docs table from what `main` measured (or the committed results file), plus the published MPS figure."""
    out = ["| configuration (batch 1, 1 tile + 64 text tokens) | base weights | LoRA rank | grad ckpt | "
           "**peak memory** | weights | trainable | s/step here | tokens/s here |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(data["results"], key=lambda n: list(LABELS).index(n) if n in LABELS else len(LABELS)):
        r, (dtype, bits, rank, gc) = data["results"][name], CONFIGS[name]
        base = f"LLM {bits}-bit" if bits else {"bfloat16": "bf16", "float32": "fp32"}[dtype]
        peak = f"**{r['peak_gb']:.2f} GB**" if dtype == "bfloat16" else f"{r['peak_gb']:.2f} GB"
        out.append(f"| {LABELS.get(name, name)} | {base} | {rank} | {'yes' if gc else 'no'} | {peak} | "
                   f"{r['weights_gb']:.2f} GB | {r['trainable_m']:.2f} M | {_secs(r['s_per_step'])} | "
                   f"{r['tokens_per_s']:.2g} |")
    return "\n".join(out + [PUBLISHED])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="internvl2_5-1b")
    p.add_argument("--configs", default=",".join(k for k in CONFIGS if not k.endswith("bf16")),
                   help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    print(f"{args.preset}: 1 tile (256 image tokens) + {TEXT_BEFORE} text + {ANSWER} answer tokens, batch 1, "
          f"all linear layers of the LLM adapted; BLAS: {os.environ.get('MLX_INTERNVL_BLAS') or 'default'}")
    results = {}
    for name in names:
        results[name] = run(args.preset, name, args.steps)
        print(f"{name}: peak {results[name]['peak_gb']:.2f} GB", flush=True)
    print(markdown({"results": results}))
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
