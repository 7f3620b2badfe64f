"""Peak memory of `mlx-internvl convert` on a sharded random checkpoint, against the size of one shard.

Builds a random original-layout InternVL checkpoint (Qwen2 language model, bf16) of about `--size-mb` split into
`--shards` files, then converts it (and exports the result back) in fresh child processes and reports that
process's peak resident memory (`ru_maxrss`) and MLX's own peak allocation (`mx.get_peak_memory`), next to the RSS
of a child that only imports the converter. Output shards are capped at `--out-shard-mb` so "one shard" means the
same on both sides.

    python benchmarks/convert_memory.py --size-mb 400 --shards 4 --out-shard-mb 100 --json results/convert.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import importlib, json, resource, sys, time
import mlx.core as mx
conv = importlib.import_module("mlx_internvl.convert.convert")  # the module, not the function it exports
mode, src, dst, shard_mb = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
conv.SHARD_BYTES = int(shard_mb * (1 << 20))
t = time.perf_counter()
if mode == "convert":
    conv.convert(src, dst, quantize_model=len(sys.argv) > 5, q_bits=4, q_group_size=64)
elif mode == "export":
    from mlx_internvl.convert.export import export_hf
    export_hf(src, dst, layout="original")
secs = time.perf_counter() - t
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "mlx_peak_mb": mx.get_peak_memory() / (1 << 20), "seconds": secs}))
"""


def build_checkpoint(root: Path, size_mb: float, shards: int) -> Path:
    """A random original-layout checkpoint, ~size_mb of bf16 weights over `shards` files + index."""
    config, tensors = _layout(size_mb)
    src = root / "original"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(config, indent=2))
    _write_shards(src, tensors, shards)
    return src


def _layout(size_mb: float):
    """(config.json dict, {key: shape}) of a Qwen2 InternVL with enough layers for ~size_mb of bf16 weights."""
    hidden, inter, vocab = 1024, 4096, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    fixed = 2 * vocab * hidden
    layers = max(1, int((size_mb * (1 << 20) / 2 - fixed) // per_layer))
    vis = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56,
               patch_size=14, norm_type="layer_norm", qkv_bias=True, qk_normalization=False, layer_norm_eps=1e-6)
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "force_image_size": 56, "ps_version": "v2", "select_layer": -1, "template": "internvl2_5",
        "torch_dtype": "bfloat16", "vision_config": vis,
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
                       "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 4,
                       "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-6,
                       "rope_theta": 1e6, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    }
    tensors = {}
    c, ps = vis["hidden_size"], 14
    v = "vision_model."
    tensors[v + "embeddings.class_embedding"] = (1, 1, c)
    tensors[v + "embeddings.position_embedding"] = (1, 17, c)
    tensors[v + "embeddings.patch_embedding.weight"] = (c, 3, ps, ps)
    tensors[v + "embeddings.patch_embedding.bias"] = (c,)
    for i in range(vis["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        shapes = {"attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,), "attn.proj.weight": (c, c),
                  "attn.proj.bias": (c,), "mlp.fc1.weight": (128, c), "mlp.fc1.bias": (128,),
                  "mlp.fc2.weight": (c, 128), "mlp.fc2.bias": (c,), "norm1.weight": (c,), "norm1.bias": (c,),
                  "norm2.weight": (c,), "norm2.bias": (c,), "ls1": (c,), "ls2": (c,)}
        tensors.update({p + k: v for k, v in shapes.items()})
    tensors.update({"mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,), "mlp1.1.weight": (hidden, 4 * c),
                    "mlp1.1.bias": (hidden,), "mlp1.3.weight": (hidden, hidden), "mlp1.3.bias": (hidden,)})
    lm = "language_model."
    tensors[lm + "model.embed_tokens.weight"] = (vocab, hidden)
    tensors[lm + "lm_head.weight"] = (vocab, hidden)
    tensors[lm + "model.norm.weight"] = (hidden,)
    kv = hidden // 16 * 4
    for i in range(layers):
        p = f"{lm}model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
                        p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
                        p + "self_attn.o_proj.weight": (hidden, hidden), p + "mlp.gate_proj.weight": (inter, hidden),
                        p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter),
                        p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    return config, tensors


def _write_shards(src: Path, tensors: dict, shards: int) -> None:
    import mlx.core as mx

    total = sum(2 * _numel(s) for s in tensors.values())
    budget = total / shards
    names, groups, size = sorted(tensors), [[]], 0
    for name in names:
        n = 2 * _numel(tensors[name])
        if groups[-1] and size + n > budget and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        arrays = {k: (0.02 * mx.random.normal(tensors[k])).astype(mx.bfloat16) for k in group}
        mx.save_safetensors(str(src / fname), arrays, metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
        del arrays
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def child(mode: str, src: Path, dst: Path, shard_mb: float, quantize: bool = False) -> dict:
    args = [sys.executable, "-c", CHILD, mode, str(src), str(dst), str(shard_mb)] + (["q"] if quantize else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(data: dict) -> str:
    """The docs table from the runs in a results file (several invocations' runs, appended by --json)."""
    out = ["| checkpoint | output shards | MLX peak allocation | peak RSS (baseline after imports) | time |",
           "|---|---|---|---|---|"]
    for r in data["runs"]:
        what = f"{r['checkpoint_mb']:.0f} MB in {r['shards']} shards" + (", `-q` 4-bit" if r["quantize"] else "")
        if r["mode"] == "export":
            what = f"`export` of the {r['checkpoint_mb']:.0f} MB MLX result (original layout)"
        out.append(f"| {what} | {r['out_shard_mb']:.0f} MB | {r['mlx_peak_mb']:.0f} MB | {r['rss_mb']:.0f} MB "
                   f"({r['baseline_rss_mb']:.0f} MB) | {r['seconds']:.1f} s |")
    return "\n".join(out)


def measure(args) -> list:
    runs = []
    with tempfile.TemporaryDirectory(prefix="convert-memory-") as tmp:
        root = Path(tmp)
        src = build_checkpoint(root, args.size_mb, args.shards)
        sizes = [f.stat().st_size / (1 << 20) for f in sorted(src.glob("*.safetensors"))]
        base = child("import", src, root / "none", args.out_shard_mb)
        todo = [("convert", src, "mlx-0", False)] + ([("convert", src, "mlx-1", True)] if args.quantize else [])
        for mode, source, dest, q in todo + [("export", root / "mlx-0", "export", False)]:
            r = child(mode, source, root / dest, args.out_shard_mb, q)
            runs.append(dict(checkpoint_mb=sum(sizes), shards=len(sizes), out_shard_mb=args.out_shard_mb, mode=mode,
                             quantize=q, mlx_peak_mb=r["mlx_peak_mb"], rss_mb=r["rss_mb"],
                             baseline_rss_mb=base["rss_mb"], seconds=r["seconds"]))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=400)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--out-shard-mb", type=float, default=100)
    ap.add_argument("--quantize", action="store_true", help="also measure a 4-bit conversion")
    ap.add_argument("--json", type=Path, default=None,
                    help="append the runs to this results file (the docs render from it)")
    args = ap.parse_args()
    runs = measure(args)
    print(markdown({"runs": runs}))
    if args.json:
        data = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
        data["runs"] += runs
        args.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
