"""Does preference tuning teach what the pairs prefer? A synthetic task on a tiny model, held-out split, each
objective against the base model and against SFT on the same pairs.

The task: an image of one large shape in one of four colours, "Color?"; the chosen answer names the colour, the
rejected one names another colour. The model is the tests' tiny seeded InternVL (Qwen2 backbone, 56 px tiles,
built with transformers by `tests/builders.py`); `--train` pairs train, `--val` pairs on other images are held out.
Every run trains LoRA (rank 8, all LLM linear layers) through `finetune` with the same settings; `sft` trains on
the chosen answers of the same pairs (the SFT conversations), `dpo` / `mpo` / `orpo` on the pairs.

Reported on the held-out pairs:
- pair accuracy: the share of pairs whose chosen answer gets the higher summed log-probability;
- answer accuracy: the share of images whose greedy answer (inference's prompt, KV cache) is the chosen answer.

    python benchmarks/preference_task.py --json benchmarks/results/preference-task-linux-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import mlx_internvl
from mlx_internvl.lora import LoraConfig, PreferenceConfig, TrainingArgs, finetune
from mlx_internvl.lora.batching import collate
from mlx_internvl.lora.forward import training_logits
from mlx_internvl.lora.pairs import encode_pair, parse_pair
from mlx_internvl.lora.preference import sequence_logps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from builders import Case, build  # noqa: E402  (the tests' tiny checkpoint builder and colour task)
from lora_fixtures import color_pairs, color_task, greedy_answer  # noqa: E402

MODES = ("sft", "dpo", "mpo", "orpo")
DEFAULTS = {"train": 24, "val": 16, "iters": 48, "batch_size": 4, "lr": 1e-2, "beta": 0.5, "seed": 0}


def held_out(model, proc, root: Path, rows) -> dict:
    """Pair accuracy (log-prob of chosen > rejected) and answer accuracy (greedy answer == chosen)."""
    pairs = [encode_pair(parse_pair(r, root), proc) for r in rows]
    batch, _ = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], proc.config, 0, proc.image_token_id)
    logps = np.array(sequence_logps(training_logits(model, batch, True), batch)[0])
    answers = [greedy_answer(model, proc, Image.open(root / r["images"][0])).strip() for r in rows]
    return {"pair_accuracy": float((logps[: len(rows)] > logps[len(rows):]).mean()),
            "answer_accuracy": float(np.mean([a == r["chosen"] for a, r in zip(answers, rows)]))}


def measure(work: Path, modes=MODES, **settings) -> dict:
    s = {**DEFAULTS, **settings}
    hf = build(Case("preference_task", seed=s["seed"]), work / "model").hf_dir
    train = color_pairs(color_task(work, s["train"], "train", seed=s["seed"]))  # also writes train.jsonl (SFT)
    val = color_pairs(color_task(work, s["val"], "val", seed=s["seed"] + 1))
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    model, proc = mlx_internvl.load(hf, dtype="float32")
    results = {"base": held_out(model, proc, work, val)}
    for mode in modes:
        out = work / f"ad-{mode}"
        preference = None if mode == "sft" else PreferenceConfig.make(mode, s["beta"])
        finetune(hf, work / ("train.jsonl" if mode == "sft" else "pairs.jsonl"), out, dtype="float32",
                 lora=LoraConfig(rank=8, alpha=16),
                 args=TrainingArgs(batch_size=s["batch_size"], iters=s["iters"], lr=s["lr"], warmup=4,
                                   save_every=s["iters"], report_every=s["iters"], seed=s["seed"]),
                 preference=preference, log=lambda *_: None)
        model, proc = mlx_internvl.load(hf, dtype="float32", adapter_path=out)
        results[mode] = held_out(model, proc, work, val)
    return {"settings": s, "results": results}


LABELS = {"base": "base model (no training)", "sft": "SFT on the chosen answers", "dpo": "DPO (sigmoid)",
          "mpo": "MPO (InternVL's recipe)", "orpo": "ORPO"}


def markdown(data: dict) -> str:
    s, res = data["settings"], data["results"]
    head = (f"| objective ({s['iters']} steps x {s['batch_size']} pairs, {s['train']} training pairs) | held-out pair "
            f"accuracy ({s['val']} pairs) | held-out answer accuracy (greedy) |")
    rows = [head, "|---|---|---|"]
    for name, r in res.items():
        rows.append(f"| {LABELS.get(name, name)} | {r['pair_accuracy']:.2f} | {r['answer_accuracy']:.2f} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = vars(p.parse_args(argv))
    out, modes = args.pop("json"), [m for m in args.pop("modes").split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        data = measure(Path(tmp), modes, **args)
    print(markdown(data))
    if out:
        out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
