"""InternVL3.5-Flash: time to first token and KV-cache size with the resolution router on and off, and the
router's own cost, at 1, 7 and 13 tiles on the full-size `internvl3_5-1b-flash` preset (random weights).

    python benchmarks/flash.py --tiles 1,7,13

The ViT is the same for both variants and linear in tiles: it runs on one tile, its time counts n times in both
variants, and the other tiles' ViT states are that tile's plus independent noise (so the router's scores differ
per tile). Each variant then adds its own projection (off: mlp1; on: pooling + gating + mlp1 + mlp2) and the
prefill of its prompt (`<IMG_CONTEXT>` x 256 per tile, or 64 per compressed tile) up to the first token. With
random weights the scores are close together; the preset's thresholds (relative 0.5, absolute 0) compress the
tiles above the request's median, so none at 1 tile (a lone tile is its own quantile, as upstream decides).
Ratios are on/off.
"""

import argparse
import time

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx
import numpy as np

from mlx_internvl.bench.presets import random_model
from mlx_internvl.flash import FlashTiles, compress_ids, route, select_features
from mlx_internvl.projector import pixel_shuffle

PRESET = "internvl3_5-1b-flash"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    mx.eval(out)
    return out, time.perf_counter() - t


def prompt_ids(model, n_tiles: int):
    text = list(range(1000, 1040))  # 40 text tokens around the image
    return text[:20] + [model.image_token_id] * (256 * n_tiles) + text[20:]


def prefill(model, ids, features):
    """Seconds to the first token's logits, and the KV cache's bytes."""
    cache = model.make_cache()

    def run():
        for _ in model.prefill(ids[:-1], features, cache):
            pass
        return model(mx.array(ids[-1:])[None], cache=cache)

    _, seconds = timed(run)
    return seconds, sum(c.nbytes for c in cache)


def router_parts(model, h):
    """The router's extra work on ViT states `h` `[P, 1025, C]`: p0 and the mlp2 projection."""
    x = h[:, 1:]
    p, n, c = x.shape
    g = int(round(n**0.5))
    p0 = model.gating(model.pooling_before_gating(x))[:, 0]
    low = model.mlp2(pixel_shuffle(x.reshape(p, g, g, c), 0.25, "v2"))
    return p0, low


def measure(model, h1: mx.array, n_tiles: int, vit_per_tile: float) -> dict:
    h = h1 + 0.5 * mx.random.normal((n_tiles, *h1.shape[1:])).astype(h1.dtype)
    mx.eval(h)
    vit = vit_per_tile * n_tiles
    full, t_mlp1 = timed(lambda: model.project_features(h))
    (p0, low), t_router = timed(lambda: router_parts(model, h))
    cfg = model.config
    compress = route(np.array(p0, dtype=np.float32), cfg.flash_relative_threshold, cfg.flash_absolute_threshold)
    ids = prompt_ids(model, n_tiles)
    short = compress_ids(ids, model.image_token_id, compress, 256, 64)
    feats = select_features(FlashTiles(np.array(p0), low, full), compress)
    off_s, off_kv = prefill(model, ids, full)
    on_s, on_kv = prefill(model, short, feats)
    off, on = vit + t_mlp1 + off_s, vit + t_mlp1 + t_router + on_s
    return dict(tiles=n_tiles, compressed=int(compress.sum()), tokens_off=len(ids), tokens_on=len(short),
                ttft_off=off, ttft_on=on, router=t_router, kv_off=off_kv, kv_on=on_kv)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", default="1,7,13")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    model = random_model(PRESET, getattr(mx, a.dtype))
    one = mx.random.normal((1, 448, 448, 3))
    mx.eval(model.vision_features(one))  # warm-up
    h1, vit_per_tile = timed(lambda: model.vision_features(one))
    print(f"`python benchmarks/flash.py --tiles {a.tiles} --dtype {a.dtype}` ({PRESET}, random weights; "
          f"ViT {vit_per_tile:.2f} s/tile)\n")
    print("| tiles | compressed | prompt tokens off / on | TTFT off s | TTFT on s | TTFT on/off | router s | "
          "router / TTFT on | KV off MB | KV on MB | KV on/off |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in a.tiles.split(","):
        r = measure(model, h1, int(n), vit_per_tile)
        print(f"| {r['tiles']} | {r['compressed']} | {r['tokens_off']} / {r['tokens_on']} | {r['ttft_off']:.2f} | "
              f"{r['ttft_on']:.2f} | {r['ttft_on'] / r['ttft_off']:.2f} | {r['router']:.3f} | "
              f"{r['router'] / r['ttft_on']:.3f} | {r['kv_off'] / 1e6:.1f} | {r['kv_on'] / 1e6:.1f} | "
              f"{r['kv_on'] / r['kv_off']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
