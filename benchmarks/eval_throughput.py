"""`eval` throughput: questions per minute at batch 1 vs batched, through the whole `runner.evaluate` path
(TSV read, VLMEvalKit prompts, tiling, ViT, batched greedy decoding, predictions appended, scoring).

The model is a full-size bench preset with random weights (default internvl2_5-1b: ViT-300M + Qwen2.5-0.5B) and
the real Qwen2.5 tokenizer of the test fixtures with InternVL's tokens added. Random weights never emit the end
token, so every answer runs to `--tokens` new tokens: each batch size does the same work. The benchmark is a
synthetic MMStar-style TSV of `--questions` one-tile pictures.

    MLX_INTERNVL_BLAS=openblas python benchmarks/eval_throughput.py --questions 4 --batch 1 4 --tokens 32 \
        --repeats 1 --json benchmarks/results/eval-throughput-internvl2_5-1b-linux-cpu.json
    python benchmarks/eval_throughput.py --preset small --questions 8 --batch 1 8 --tokens 64 \
        --json benchmarks/results/eval-throughput-small-linux-cpu.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pandas as pd
from PIL import Image

from mlx_internvl import _blas
from mlx_internvl.bench.presets import PRESETS, preset_config, random_model
from mlx_internvl.evaluation import runner
from mlx_internvl.processing import Processor
from mlx_internvl.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# A small stand-in with the real vocabulary and tile geometry (448 px, 256 tokens per tile), for machines where
# a full-size preset is too slow to measure in minutes.
PRESETS["small"] = dict(
    llm=dict(model_type="qwen2", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=1024, vocab_size=151674, rms_norm_eps=1e-6, rope_theta=1e6,
             max_position_embeddings=32768, tie_word_embeddings=False),
    vision=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, image_size=448,
                patch_size=14, norm_type="layer_norm", layer_norm_eps=1e-6, qkv_bias=True, qk_normalization=False),
    arch="Qwen2ForCausalLM", image_token_id=151667, note="4-layer ViT and Qwen2 of width 256")
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def tokenizer_dir(out: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "tests" / "fixtures" / "tokenizers" / "qwen2_5"))
    tok.add_tokens(INTERNVL_TOKENS, special_tokens=True)
    tok.save_pretrained(str(out))
    return out


def benchmark_tsv(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)).save(buf, format="PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        rows.append({"index": i, "question": f"What is in picture {i}?", "A": "a cat", "B": "a dog", "C": "a car",
                     "answer": "ABC"[i % 3], "category": "synthetic", "image": image})
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl2_5-1b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per answer")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if PRESETS[args.preset]["image_token_id"] != 151667:
        sys.exit(f"{args.preset}: only the Qwen2.5-tokenizer presets are supported here")
    model = random_model(args.preset, getattr(mx, args.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        processor = Processor(load_tokenizer(tokenizer_dir(tmp / "tok")), preset_config(args.preset))
        tsv = benchmark_tsv(tmp / "bench.tsv", args.questions)
        runner.evaluate(model, processor, "MMStar", tsv, tmp / "warm", limit=1, max_tokens=2, progress=False)
        runs = {b: [] for b in args.batch}
        for r in range(args.repeats):  # interleaved, so a change in the machine's load hits every batch size
            for b in args.batch:
                tic = time.perf_counter()
                info, _ = runner.evaluate(model, processor, "MMStar", tsv, tmp / f"r{r}b{b}", batch_size=b,
                                          max_tokens=args.tokens, progress=False)
                runs[b].append(60 * info.answered_now / (time.perf_counter() - tic))
                print(f"batch {b}: {runs[b][-1]:.2f} questions/min", flush=True)
        results = [dict(batch_size=b, questions=args.questions, runs=v, questions_per_minute=statistics.median(v))
                   for b, v in runs.items()]
    data = dict(preset=args.preset, dtype=args.dtype, tokens=args.tokens, repeats=args.repeats,
                machine=f"{platform.machine()} {platform.system()}", blas=_blas.LOADED or "mlx's own",
                results=results)
    print("\n" + markdown([data]))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")


def markdown(runs) -> str:
    """One row per batch size of each results file (`--json`), the speed-up against batch 1 of the same run."""
    out = ["| preset | BLAS | questions | new tokens each | batch | questions/min | vs batch 1 |",
           "|---|---|---|---|---|---|---|"]
    for run in runs:
        base = next((r for r in run["results"] if r["batch_size"] == 1), run["results"][0])["questions_per_minute"]
        for r in run["results"]:
            out.append(f"| {run['preset']} ({run['dtype']}) | {run.get('blas', 'not recorded')} | {r['questions']} "
                       f"| {run['tokens']} | {r['batch_size']} "
                       f"| {r['questions_per_minute']:.2f} | {r['questions_per_minute'] / base:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
