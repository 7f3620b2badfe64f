"""KV-cache options and chunked prefill on a long prompt: cache size, peak memory, prefill and decode speed.

The options are mlx-lm's, as `KVOptions` carries them to `generate`, `ChatSession` and the CLI (`--kv-bits`,
`--max-kv-size`, `--prefill-step-size`). Full-size preset with random weights; a prompt of
`--prompt` tokens stands for a long video prompt (16 frames are 4096 image tokens). Each variant runs in this one
process after a warm-up; MLX's peak is reset before each.

    python benchmarks/kv_memory.py --preset internvl2_5-1b --prompt 2048 --tokens 16 --json results/kv.json
"""

import argparse
import json
import time
from pathlib import Path

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_internvl.bench.presets import random_model
from mlx_internvl.sampling import KVOptions

# name -> (how the docs' table shows it, the KVOptions fields)
VARIANTS = {
    "default": ("default (fp cache, prefill chunks of 2048)", {}),
    "prefill_512": ("`--prefill-step-size 512`", {"prefill_step_size": 512}),
    "kv_bits_8": ("`--kv-bits 8`", {"kv_bits": 8, "quantized_kv_start": 0}),
    "kv_bits_4": ("`--kv-bits 4`", {"kv_bits": 4, "quantized_kv_start": 0}),
    "max_kv_1024": ("`--max-kv-size 1024` (rotating)", {"max_kv_size": 1024}),
}


def run(model, ids, n, kw):
    kv = KVOptions(**kw)  # the settings generate/ChatSession take, checked the same way
    cache = kv.make_cache(model)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t = time.perf_counter()
    steps = generate_step(ids, model, max_tokens=n + 1, prompt_cache=cache, **kv.step_kwargs())
    next(steps)
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    k = sum(1 for _ in steps)
    dec = k / (time.perf_counter() - t)
    return ttft, dec, sum(c.nbytes for c in cache), mx.get_peak_memory() - base


def markdown(data: dict) -> str:
    """The docs table from the rows `main` measured (or the committed results file)."""
    out = ["| variant | KV cache MB | peak over weights MB | time to first token s | decode tok/s |",
           "|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {VARIANTS[r['variant']][0]} | {r['kv_mb']:.0f} | {r['peak_mb']:.0f} | {r['ttft_s']:.1f} | "
                   f"{r['decode_tps']:.2f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="internvl2_5-1b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here (the docs render from it)")
    a = p.parse_args()
    model = random_model(a.preset, getattr(mx, a.dtype))
    ids = mx.array([1000 + (i * 7919) % 20000 for i in range(a.prompt)], dtype=mx.int32)
    run(model, ids[:64], 2, {})  # warm-up
    print(f"{a.preset} {a.dtype} {mx.default_device()}, prompt {a.prompt} tokens, then {a.tokens} decode tokens")
    data = dict(preset=a.preset, dtype=a.dtype, prompt=a.prompt, tokens=a.tokens, rows=[])
    for name, (_, kw) in VARIANTS.items():
        ttft, dec, kv, peak = run(model, ids, a.tokens, kw)
        data["rows"].append(dict(variant=name, kv_mb=kv / 1e6, peak_mb=peak / 1e6, ttft_s=ttft, decode_tps=dec))
        print(f"{name}: {ttft:.1f} s to the first token", flush=True)
    print(markdown(data))
    if a.json:
        a.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
