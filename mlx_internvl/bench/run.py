"""`mlx-internvl bench`: run the measurements (each in its own process) and print a markdown table and JSON.

Defaults depend on the backend. On Metal: every preset in float32, bfloat16 and 4-bit. On MLX's CPU backend (Linux):
only float32 — MLX's CPU bf16 and quantized matmuls have no fast kernels, so timing them says nothing about a Mac
— and only the 1B preset unless `--presets` asks for more, so a run takes minutes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Iterable, List, Optional

import mlx.core as mx

from ..errors import UserError
from ..files import atomic_write_text
from .presets import PRESETS

ALL_DTYPES = ("float32", "bfloat16", "4bit")


def backend_defaults():
    gpu = mx.default_device() == mx.gpu
    presets = list(PRESETS) if gpu else ["internvl2_5-1b"]
    dtypes = list(ALL_DTYPES) if gpu else ["float32"]
    return presets, dtypes, gpu


def _run_one(side: str, preset: str, dtype: str, kwargs: dict, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "mlx_internvl.bench.measure", side, preset, dtype, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"side": side, "preset": preset, "dtype": dtype, "error": " | ".join(tail) or f"exit {proc.returncode}"}


def run(presets: Iterable[str], dtypes: Iterable[str], tiles=(1, 13), decode_tokens: int = 128,
        torch: bool = True, torch_device: str = "cpu", load_time: bool = True, timeout: int = 3600,
        progress=print) -> List[dict]:
    results = []
    for preset in presets:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        for dtype in dtypes:
            kw = {"tiles": list(tiles), "decode_tokens": decode_tokens, "load_time": load_time}
            progress(f"[bench] mlx   {preset} {dtype} ...")
            results.append(_run_one("mlx", preset, dtype, kw, timeout))
            if torch and dtype != "4bit":
                progress(f"[bench] torch {preset} {dtype} ...")
                results.append(_run_one("torch", preset, dtype, dict(kw, device=torch_device), timeout))
    return results


def _f(x, fmt="{:.2f}"):
    return "–" if x is None or x != x else fmt.format(x)


def markdown(results: List[dict], tiles=(1, 13)) -> str:
    t0, t1 = str(tiles[0]), str(tiles[-1])
    head = ["preset", "dtype", "side", "load s", "ViT ms/tile", f"TTFT {t0} tile s", f"TTFT {t1} tiles s",
            f"prefill tok/s ({t1} tiles)", "decode tok/s", "mlx-lm decode tok/s", "VLM/mlx-lm decode",
            "decode / BW limit", "peak mem GB", "peak RSS GB"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            cells = f"| {r['preset']} | {r['dtype']} | {r['side']} | error: {r['error']} |"
            rows.append(cells + " |" * (len(head) - 4))
            continue
        tt = {str(k): v for k, v in r.get("ttft_s", {}).items()}
        pf = {str(k): v for k, v in r.get("prefill_tps", {}).items()}
        plain = r.get("plain_decode_tps")
        ratio = r["decode_tps"] / plain if plain else None
        rows.append("| " + " | ".join([
            r["preset"], r["dtype"], r["side"], _f(r.get("load_s")), _f(r.get("vision_ms_per_tile"), "{:.0f}"),
            _f(tt.get(t0)), _f(tt.get(t1)), _f(pf.get(t1), "{:.0f}"), _f(r.get("decode_tps")), _f(plain),
            _f(ratio, "{:.3f}"), _f(r.get("decode_bw_fraction"), "{:.0%}"), _f(r.get("peak_memory_gb")),
            _f(r.get("peak_rss_gb")),
        ]) + " |")
    ratio_rows = _ratios(results, t0, t1)
    if ratio_rows:
        rows += ["", "MLX vs torch reference (same preset and dtype, >1 means MLX is faster):", "",
                 f"| preset | dtype | TTFT {t0} tile | TTFT {t1} tiles | decode |",
                 "|---|---|---|---|---|"] + ratio_rows
    return "\n".join(rows)


def _ratios(results, t0, t1):
    by = {(r["preset"], r["dtype"], r["side"]): r for r in results if "error" not in r}
    rows = []
    for (preset, dtype, side), m in by.items():
        t = by.get((preset, dtype, "torch"))
        if side != "mlx" or t is None:
            continue
        mt, tt = {str(k): v for k, v in m["ttft_s"].items()}, {str(k): v for k, v in t["ttft_s"].items()}
        rows.append(f"| {preset} | {dtype} | {_f(tt.get(t0) / mt[t0] if t0 in mt and t0 in tt else None)}x | "
                    f"{_f(tt.get(t1) / mt[t1] if t1 in mt and t1 in tt else None)}x | "
                    f"{_f(m['decode_tps'] / t['decode_tps'])}x |")
    return rows


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "mlx": mx.__version__, "device": str(mx.default_device()),
            "blas_preload": os.environ.get("MLX_INTERNVL_BLAS") or None}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def main(presets: Optional[List[str]], dtypes: Optional[List[str]], tiles, decode_tokens, torch, torch_device,
         load_time, json_path, markdown_path, echo=print) -> List[dict]:
    d_presets, d_dtypes, _ = backend_defaults()
    presets = presets or d_presets
    dtypes = dtypes or d_dtypes
    results = run(presets, dtypes, tiles, decode_tokens, torch, torch_device, load_time, progress=echo)
    table = markdown(results, tiles)
    info = machine()
    echo("")
    echo(f"Machine: {info}")
    echo(table)
    if json_path:
        atomic_write_text(json_path, json.dumps({"machine": info, "results": results}, indent=2), "JSON results")
    if markdown_path:
        atomic_write_text(markdown_path, f"Machine: `{info}`\n\n{table}\n", "markdown table")
    return results
