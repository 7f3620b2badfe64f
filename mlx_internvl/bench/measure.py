"""One benchmark measurement: a preset, a dtype, one side (MLX or torch), run in a fresh process.

Each (side, preset, dtype) runs in its own subprocess so that peak memory (MLX allocator peak and the process's peak
RSS) belongs to that run alone and one side's caches cannot help the other. Both sides do the same work on the same
shapes: random weights, random pixels, a prompt of `text_tokens` random text ids around
`<img><IMG_CONTEXT>*256T</img>`.

Measured (all wall-clock, after one warm-up of each path):
- load_s: loading the model from disk (MLX: a converted directory; torch: `from_pretrained` of an -hf directory);
- vision_ms_per_tile: ViT + pixel shuffle + mlp1 on 13 tiles, divided by 13;
- ttft_s[T]: pixels -> image features -> merged embeddings -> prefill -> first token, for T tiles;
- prefill_tps[T]: prompt tokens / (ttft - vision time);
- decode_tps: tokens/s over `decode_tokens` greedy steps after the first token (no early stop), after the prompt
  with the first tile count (MLX: median of `decode_repeats` runs);
- plain_decode_tps (MLX only): mlx-lm's own `generate_step` on the bare language model, same weights, a text prompt
  of the same length, its runs alternating with the VLM's (median) — the VLM must add nothing per token;
- bandwidth_gbs (MLX only): a streaming read of 1 GiB (MLX on the GPU, numpy on the CPU);
  decode_bw_fraction = decode_tps / (bandwidth / bytes read per token), bytes = all language-model weights except
  the embedding table.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from ..loading import load_model
from ..weights import quantize, save_mlx_model
from .presets import PRESETS, random_model, torch_config_kwargs, weight_bytes

DECODE_TOKENS = 128
TEXT_TOKENS = 32


def prompt_ids(image_token_id: int, tiles: int, vocab_size: int, text_tokens: int = TEXT_TOKENS, seed: int = 0):
    """Random text ids (below the image tokens and inside the vocabulary) around one image block."""
    rng = np.random.default_rng(seed)
    hi = min(20000, vocab_size, image_token_id - 2)
    lo = hi // 20
    head = rng.integers(lo, hi, size=text_tokens // 2).tolist()
    tail = rng.integers(lo, hi, size=text_tokens - text_tokens // 2).tolist()
    image = [image_token_id - 2] + [image_token_id] * (256 * tiles) + [image_token_id - 1]
    return head + image + tail


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def measure_bandwidth() -> float:
    """GB/s of a streaming read of 1 GiB (best of 5): the memory-read rate one decode step can hope for.

    On the GPU this is an MLX reduction; on the CPU backend MLX's reductions are single-threaded scalar code that
    reads far below the memory's rate, so numpy's vectorised sum measures the hardware instead."""
    if mx.default_device() == mx.gpu:
        x = mx.ones((1 << 28,), dtype=mx.float32)
        mx.eval(x)
        read = lambda: mx.eval(x.sum())  # noqa: E731
    else:
        x = np.ones(1 << 28, dtype=np.float32)
        read = x.sum
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t)
    return (1 << 30) / best / 1e9


def _mlx_model(preset: str, dtype: str, load_time: bool, out: dict):
    """The preset's random model in `dtype` ('4bit': quantized float16), saved and loaded back when timing loads."""
    base = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16, "4bit": mx.float16}[dtype]
    model = random_model(preset, base)
    if dtype == "4bit":
        model.config.quantization = quantize(model, 4, 64)
        mx.eval(model.parameters())
    if not load_time:
        return model
    tmp = Path(tempfile.mkdtemp(prefix="mlx-internvl-bench-")) / "model"
    try:
        save_mlx_model(dict(tree_flatten(model.parameters())), model.config, tmp)
        del model
        mx.clear_cache()
        t = time.perf_counter()
        model, _ = load_model(tmp)
        out["load_s"] = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return model


def _mlx_first_token(model, preset: str, t_tiles: int):
    """(ids, merged embeddings, vision seconds, seconds to the first token) for a prompt with `t_tiles` tiles."""
    ids = prompt_ids(PRESETS[preset]["image_token_id"], t_tiles, PRESETS[preset]["llm"]["vocab_size"])
    pv = mx.random.normal((t_tiles, 448, 448, 3), key=mx.random.key(1))
    mx.eval(pv)
    t0 = time.perf_counter()
    feats = model.extract_feature(pv)
    mx.eval(feats)
    t_vis = time.perf_counter() - t0
    arr = mx.array(ids, dtype=mx.int32)
    embeds = model.get_input_embeddings(arr[None], image_features=feats)[0]
    next(generate_step(arr, model, max_tokens=1, input_embeddings=embeds))
    return arr, embeds, t_vis, time.perf_counter() - t0


def _decode_tps(lm, arr, decode_tokens: int, embeds=None) -> float:
    kw = {} if embeds is None else {"input_embeddings": embeds}
    steps = generate_step(arr, lm, max_tokens=decode_tokens + 1, **kw)
    next(steps)
    t1 = time.perf_counter()
    n = sum(1 for _ in steps)
    return n / (time.perf_counter() - t1)


def _mlx_decode(model, preset: str, arr, embeds, decode_tokens: int, repeats: int, out: dict) -> None:
    """Decode after the image prompt, and plain mlx-lm on the bare backbone (same weights, a text prompt of the
    same length), alternating order over `repeats` runs; medians are reported, so machine drift does not decide
    the VLM/mlx-lm comparison."""
    image_token_id = PRESETS[preset]["image_token_id"]
    text = mx.array([t if t != image_token_id else 1 for t in arr.tolist()], dtype=mx.int32)
    runs = {"vlm": [], "plain": []}
    for r in range(repeats):
        for side in ("vlm", "plain") if r % 2 == 0 else ("plain", "vlm"):
            runs[side].append(_decode_tps(model, arr, decode_tokens, embeds) if side == "vlm"
                              else _decode_tps(model.language_model, text, decode_tokens))
    out["prompt_tokens_decode"] = arr.size
    out["decode_runs_tps"], out["plain_decode_runs_tps"] = runs["vlm"], runs["plain"]
    out["decode_tps"] = statistics.median(runs["vlm"])
    out["plain_decode_tps"] = statistics.median(runs["plain"])


def run_mlx(preset: str, dtype: str, tiles=(1, 13), decode_tokens=DECODE_TOKENS, load_time=True,
            decode_repeats: int = 3) -> dict:
    out = {"side": "mlx", "preset": preset, "dtype": dtype, "device": str(mx.default_device())}
    model = _mlx_model(preset, dtype, load_time, out)
    mx.reset_peak_memory()
    _mlx_first_token(model, preset, 1)  # warm-up: compiles kernels, touches weights
    out["ttft_s"], out["prefill_tps"] = {}, {}
    for t_tiles in tiles:
        arr, embeds, t_vis, ttft = _mlx_first_token(model, preset, t_tiles)
        out["ttft_s"][t_tiles] = ttft
        out["prefill_tps"][t_tiles] = arr.size / (ttft - t_vis)
        out["vision_ms_per_tile"] = 1e3 * t_vis / t_tiles
        if t_tiles == tiles[0]:
            decode_prompt = (arr, embeds)
    _mlx_decode(model, preset, *decode_prompt, decode_tokens, decode_repeats, out)
    out["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    out["peak_rss_gb"] = peak_rss_gb()
    out["bandwidth_gbs"] = measure_bandwidth()
    out["decode_bytes_per_token"] = weight_bytes(model)
    limit = out["bandwidth_gbs"] * 1e9 / out["decode_bytes_per_token"]
    out["decode_bw_fraction"] = out["decode_tps"] / limit
    return out


def _torch_model(preset: str, tdtype, load_time: bool, out: dict):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(**torch_config_kwargs(preset))
    model = InternVLForConditionalGeneration(config).to(tdtype)
    if not load_time:
        return model
    tmp = Path(tempfile.mkdtemp(prefix="mlx-internvl-bench-torch-"))
    try:
        model.save_pretrained(str(tmp))
        del model
        t = time.perf_counter()
        model = InternVLForConditionalGeneration.from_pretrained(str(tmp), dtype=tdtype, attn_implementation="sdpa")
        out["load_s"] = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def _torch_run(model, preset: str, t_tiles: int, n_decode: int, device: str, tdtype):
    """(prompt tokens, vision seconds, seconds to the first token, decode tokens/s) for `t_tiles` tiles."""
    import torch

    ids = prompt_ids(PRESETS[preset]["image_token_id"], t_tiles, PRESETS[preset]["llm"]["vocab_size"])
    ids = torch.tensor([ids], device=device)
    pv = torch.randn((t_tiles, 3, 448, 448), generator=torch.Generator().manual_seed(1)).to(device, tdtype)
    with torch.no_grad():
        t0 = time.perf_counter()
        feats = model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
        _ = feats.sum().item()
        t_vis = time.perf_counter() - t0
        t0 = time.perf_counter()
        o = model(input_ids=ids, pixel_values=pv, use_cache=True)
        tok = o.logits[:, -1].argmax(-1, keepdim=True)
        tok.item()
        ttft = time.perf_counter() - t0
        past = o.past_key_values
        t1 = time.perf_counter()
        for _ in range(n_decode):
            o = model(input_ids=tok, past_key_values=past, use_cache=True)
            past = o.past_key_values
            tok = o.logits[:, -1].argmax(-1, keepdim=True)
            tok.item()
        dec = n_decode / (time.perf_counter() - t1) if n_decode else float("nan")
    return ids.shape[1], t_vis, ttft, dec


def run_torch(preset: str, dtype: str, tiles=(1, 13), decode_tokens=DECODE_TOKENS, load_time=True,
              device: str = "cpu") -> dict:
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out = {"side": "torch", "preset": preset, "dtype": dtype, "device": device,
           "torch_threads": torch.get_num_threads()}
    torch.manual_seed(0)
    model = _torch_model(preset, tdtype, load_time, out)
    model.to(device).eval()
    _torch_run(model, preset, 1, 2, device, tdtype)  # warm-up
    out["ttft_s"], out["prefill_tps"] = {}, {}
    for t_tiles in tiles:
        n_tok, t_vis, ttft, dec = _torch_run(model, preset, t_tiles, decode_tokens if t_tiles == tiles[0] else 0,
                                             device, tdtype)
        # torch's forward does the vision pass again inside; TTFT is that one call.
        out["ttft_s"][t_tiles] = ttft
        out["prefill_tps"][t_tiles] = n_tok / max(ttft - t_vis, 1e-9)
        if t_tiles == tiles[0]:
            out["decode_tps"] = dec
        out["vision_ms_per_tile"] = 1e3 * t_vis / t_tiles
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def main(argv=None):
    """`python -m mlx_internvl.bench.measure SIDE PRESET DTYPE JSON_ARGS` -> one JSON line on stdout."""
    argv = argv or sys.argv[1:]
    side, preset, dtype = argv[:3]
    kwargs = json.loads(argv[3]) if len(argv) > 3 else {}
    if "tiles" in kwargs:
        kwargs["tiles"] = tuple(kwargs["tiles"])
    result = (run_mlx if side == "mlx" else run_torch)(preset, dtype, **kwargs)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
