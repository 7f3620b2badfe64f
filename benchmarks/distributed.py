"""Tensor parallel over mx.distributed: peak memory per rank and decode speed with 1 and 2 ranks, plus the memory
plan of the largest InternVLs computed from their configs.

    python benchmarks/distributed.py                 # prepare the preset, run 1 rank, then 2 ranks (mlx.launch)
    python benchmarks/distributed.py plan            # memory per rank for InternVL3-78B / InternVL3.5-241B-A28B

The measured runs use a full-size preset with random weights (default internvl3-1b, float32: the Linux CPU backend
has no fast bf16/4-bit kernels), written once as a converted directory and loaded the way `mlx-internvl generate`
loads it (lazily, sharded, then evaluated). Both ranks of the 2-rank run share this machine's cores and talk over
localhost TCP (ring backend), so the speed figures say nothing about two Macs on Thunderbolt; see docs/distributed.md's
bandwidth model for that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_internvl  # noqa: F401  (first: MLX_INTERNVL_BLAS must load OpenBLAS before mlx.core is imported)


def prepare(preset: str, out: Path) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_internvl.bench.presets import random_model
    from mlx_internvl.files import save_weights
    from mlx_internvl.weights import save_config

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(preset, mx.float32)
    save_weights(dict(tree_flatten(model.parameters())), out)
    save_config(model.config, out)
    return out


def rank_main(model_dir: str, tokens: int, result: str) -> None:
    """One rank (or the single process): load, then time greedy decode after a 64-token text prompt."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step

    from mlx_internvl import distributed, sharding
    from mlx_internvl.loading import load_model

    group = distributed.start()
    t0 = time.perf_counter()
    model, _ = load_model(model_dir, lazy=True)
    if group is not None:
        sharding.check_shardable(model.config, group.size)
        sharding.shard_model(model, group)
    mx.eval(model.parameters())
    if group is not None:
        group.barrier()
    load_s = time.perf_counter() - t0
    load_peak = mx.get_peak_memory() / 1e9
    held = sum(v.nbytes for v in _leaves(model.parameters())) / 1e9

    vocab = model.config.llm_config["vocab_size"]
    prompt = mx.array(np.random.default_rng(0).integers(100, min(vocab, 20000), size=64), dtype=mx.int32)
    sampler = distributed.agree(lambda lp: mx.argmax(lp, axis=-1))
    runs = []
    for _ in range(2):
        steps = generate_step(prompt, model, max_tokens=tokens + 1, sampler=sampler)
        next(steps)
        tic = time.perf_counter()
        n = sum(1 for _ in steps)
        runs.append(n / (time.perf_counter() - tic))
    out = {"rank": 0 if group is None else group.rank, "size": 1 if group is None else group.size,
           "load_s": load_s, "held_gb": held, "peak_after_load_gb": load_peak,
           "peak_gb": mx.get_peak_memory() / 1e9,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
           "decode_tps_runs": runs, "decode_tps": max(runs)}
    Path(f"{result}.{out['rank']}.json").write_text(json.dumps(out))
    if group is not None:
        group.close()


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


def measure(preset: str, tokens: int, work: Path) -> dict:
    model_dir = prepare(preset, work / preset)
    results = {}
    me = [sys.executable, str(Path(__file__).resolve())]
    for n in (1, 2):
        res = work / f"result-{n}"
        cmd = [*me, "rank", str(model_dir), "--tokens", str(tokens), "--result", str(res)]
        _spawn(cmd, n, work)
        results[n] = [json.loads(Path(f"{res}.{r}.json").read_text()) for r in range(n)]
    return results


def _spawn(cmd, n: int, work: Path, port: int = 47311) -> None:
    """The ranks started as `mlx.launch -n N --backend ring` starts them (a ring hostfile and MLX_RANK), without
    the launcher itself: its stdin-forwarding loop keeps a core busy, which on a 2-core machine skews the timing."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if n > 1:
        hostfile = work / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
        env["MLX_HOSTFILE"] = str(hostfile)
    procs = [subprocess.Popen(cmd, env=dict(env, MLX_RANK=str(r))) for r in range(n)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank failed: {cmd}")


def markdown(preset: str, results: dict) -> str:
    rows = ["| ranks | rank | weights held (GB) | MLX peak after load (GB) | MLX peak (GB) | peak RSS (GB) | "
            "decode tok/s |", "|---|---|---|---|---|---|---|"]
    for n, ranks in results.items():
        for r in ranks:
            rows.append(f"| {n} | {r['rank']} | {r['held_gb']:.2f} | {r['peak_after_load_gb']:.2f} | "
                        f"{r['peak_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['decode_tps']:.2f} |")
    return f"{preset}, float32\n\n" + "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# Memory plan from the configs (spec §6): the model is built lazily, nothing is allocated.

VIT_6B = dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
              image_size=448, patch_size=14, norm_type="rms_norm", layer_norm_eps=1e-6, qkv_bias=False,
              qk_normalization=True)
BIG = {
    "InternVL3-78B": dict(model_type="qwen2", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, intermediate_size=29568, vocab_size=151674, rms_norm_eps=1e-6,
                          rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False),
    "InternVL3.5-241B-A28B": dict(model_type="qwen3_moe", hidden_size=4096, num_hidden_layers=94,
                                  num_attention_heads=64, num_key_value_heads=4, head_dim=128, intermediate_size=12288,
                                  moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8,
                                  decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                                  vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                                  max_position_embeddings=40960, tie_word_embeddings=False),
}
SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def plan(sizes=(1, 2, 4), bits: int = 4, group_size: int = 64) -> str:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_internvl.config import ModelConfig, VisionConfig
    from mlx_internvl.weights import build_model, quantize

    rows = ["| model | ranks | LLM split part per rank | LLM whole part (embeddings, head, norms, routers) | "
            "ViT + projector, rank 0 only (bf16 / 4-bit) | rank 0 total (ViT bf16 / 4-bit) | other ranks | "
            "KV cache per 1k tokens per rank |", "|---|---|---|---|---|---|---|---|"]
    for name, llm in BIG.items():
        sizes_gb = {}
        for q_vision in (False, True):
            config = ModelConfig(vision_config=VisionConfig(**VIT_6B), llm_config=dict(llm), template="internvl2_5")
            model = build_model(config)  # parameters are lazy random arrays: shapes and dtypes only
            model.set_dtype(mx.bfloat16)
            quantize(model, bits, group_size, quantize_vision=q_vision)
            split = whole = vit = 0
            for k, v in tree_flatten(model.parameters()):
                nbytes = v.size * v.dtype.size
                if not k.startswith("language_model."):
                    vit += nbytes
                elif any(f".{p}." in k for p in SPLIT):
                    split += nbytes
                else:
                    whole += nbytes
            sizes_gb[q_vision] = (split / 1e9, whole / 1e9, vit / 1e9)
            del model
        split, whole, vit16 = sizes_gb[False]
        vit4 = sizes_gb[True][2]
        head_dim = llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"]
        kv_1k = llm["num_hidden_layers"] * 2 * llm["num_key_value_heads"] * head_dim * 2 * 1024 / 1e9
        for n in sizes:
            if llm["num_key_value_heads"] % n:
                rows.append(f"| {name} | {n} | - | - | - | - | - | {llm['num_key_value_heads']} KV heads: "
                            f"not splittable over {n} |")
                continue
            per = split / n
            rows.append(f"| {name} | {n} | {per:.1f} GB | {whole:.1f} GB | {vit16:.1f} / {vit4:.1f} GB | "
                        f"{per + whole + vit16:.1f} / {per + whole + vit4:.1f} GB | {per + whole:.1f} GB | "
                        f"{kv_1k / n:.2f} GB |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("rank")
    r.add_argument("model_dir")
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--result", required=True)
    sub.add_parser("plan")
    p.add_argument("--preset", default="internvl3-1b")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--work", default=None, help="where the preset is written (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.cmd == "rank":
        rank_main(args.model_dir, args.tokens, args.result)
        return
    if args.cmd == "plan":
        print(plan())
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mlx-internvl-dist-"))
    try:
        results = measure(args.preset, args.tokens, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(args.preset, results))
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "results": results}, indent=2))


if __name__ == "__main__":
    main()
