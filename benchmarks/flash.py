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

`--server-tiles` adds the server's turn-2 time to first token with its caches on (the defaults): a one-image chat
(the test photo at `--max-tiles` 1, 6 or 12 gives 1, 7 or 13 tiles) whose turn 1 is answered and then resent as
history with a second question, through the HTTP API and the `openai` client, with `flash` on and off. The turn-2
prompt extends turn 1's, so the prompt cache keeps the image's tokens and the vision cache its tiles; turn 2 runs
the router again over the cached tiles (the same decisions, so the same cache keys).

    python benchmarks/flash.py --tiles 1,7,13 --server-tiles 1,7,13              # the full-size preset
    MLX_INTERNVL_BLAS=openblas python benchmarks/flash.py --tiles 1,7,13 --server-tiles 1,7,13 --clock cpu \
        --json benchmarks/results/flash-linux-cpu.json   # the docs' figures (Linux CPU, OpenBLAS)
    python benchmarks/flash.py --tiles 1,7 --layers 1    # a quick look: one ViT and one LLM layer at full width

With `--layers` the router's share of the time to first token is far larger than on the full-size model (its
cost per tile, a fraction of one ViT layer's, does not shrink with the layers), so only the token and KV figures of
such a run carry over. `--clock cpu` times this process's CPU seconds instead of wall seconds, steadier on a
shared machine.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx
import numpy as np

from mlx_internvl.bench.presets import random_model
from mlx_internvl.flash import FlashTiles, compress_ids, route, select_features
from mlx_internvl.projector import pixel_shuffle
from mlx_internvl.server import running

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

import openai  # noqa: E402
from server_bench import make_server, shallow, ttft  # noqa: E402

from server_util import IMG1, user  # noqa: E402

PRESET = "internvl3_5-1b-flash"
MAX_TILES = {1: 1, 7: 6, 13: 12}  # the test photo (1000x747) at these --max-tiles gives 1, 7 and 13 tiles


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU seconds, all threads
CLOCK = [time.perf_counter]


def timed(fn):
    t = CLOCK[0]()
    out = fn()
    mx.eval(out)
    return out, CLOCK[0]() - t


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


def server_turn2(preset: str, n_tiles: int, dtype: str, flash: bool, answer_tokens: int, repeats: int) -> dict:
    """Turn-1 and turn-2 time to first token (median of `repeats` chats) of a one-image chat on a server with its
    caches on, the Flash router on or off."""
    app = make_server(preset, dtype, max_tiles=MAX_TILES[n_tiles], max_tokens=answer_tokens, flash=flash)
    runs = []
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
        for r in range(repeats):
            msgs = [user(f"Describe this photo ({r}).", IMG1)]
            t1, use1 = ttft(client, msgs, CLOCK[0], max_tokens=answer_tokens)
            reply = client.chat.completions.create(model="bench", messages=msgs, max_tokens=answer_tokens)
            msgs += [{"role": "assistant", "content": reply.choices[0].message.content},
                     user("What else is in it?")]
            t2, use2 = ttft(client, msgs, CLOCK[0], max_tokens=2)
            runs.append(dict(turn1_s=t1, turn2_s=t2, turn1_tokens=use1.prompt_tokens,
                             turn2_tokens=use2.prompt_tokens, turn2_cached=use2.prompt_tokens_details.cached_tokens))
    out = {k: statistics.median(r[k] for r in runs) for k in ("turn1_s", "turn2_s")}
    return dict(runs[-1], **out)


def markdown(data: dict) -> str:
    """The docs' tables from what `main` measured (or the committed results file)."""
    s = "CPU s" if data.get("clock") == "cpu" else "s"
    out = [f"| tiles | compressed | prompt tokens off / on | TTFT off {s} | TTFT on {s} | TTFT on/off | router {s} | "
           "router / TTFT on | KV off MB | KV on MB | KV on/off |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["prefill"]:
        out.append(f"| {r['tiles']} | {r['compressed']} | {r['tokens_off']} / {r['tokens_on']} | "
                   f"{r['ttft_off']:.2f} | {r['ttft_on']:.2f} | **{r['ttft_on'] / r['ttft_off']:.2f}** | "
                   f"{r['router']:.3f} | {r['router'] / r['ttft_on']:.3f} | {r['kv_off'] / 1e6:.1f} | "
                   f"{r['kv_on'] / 1e6:.1f} | **{r['kv_on'] / r['kv_off']:.2f}** |")
    if data.get("server"):
        out += ["", "| server, caches on | tiles | prompt tokens off / on | cached on turn 2 off / on | "
                f"turn-1 TTFT off / on {s} | on/off | turn-2 TTFT off / on {s} | on/off |",
                "|---|---|---|---|---|---|---|---|"]
        for s in data["server"]:
            off, on = s["off"], s["on"]
            out.append(f"| one image, history resent | {s['tiles']} | {off['turn2_tokens']} / {on['turn2_tokens']} | "
                       f"{off['turn2_cached']} / {on['turn2_cached']} | {off['turn1_s']:.2f} / {on['turn1_s']:.2f} | "
                       f"**{on['turn1_s'] / off['turn1_s']:.2f}** | {off['turn2_s']:.2f} / {on['turn2_s']:.2f} | "
                       f"{on['turn2_s'] / off['turn2_s']:.2f} |")
    return "\n".join(out)


def prefill_rows(preset: str, tiles: str, dtype: str, rows: list, save) -> float:
    """Appends `measure`'s row per tile count to `rows`; returns the ViT's seconds per tile. The model is freed
    on return (the servers load their own)."""
    model = random_model(preset, getattr(mx, dtype))
    one = mx.random.normal((1, 448, 448, 3))
    mx.eval(model.vision_features(one))  # warm-up
    h1, vit_per_tile = timed(lambda: model.vision_features(one))
    print(f"{preset}, random weights, {dtype}; ViT {vit_per_tile:.2f} s/tile", flush=True)
    for n in filter(None, tiles.split(",")):
        rows.append(measure(model, h1, int(n), vit_per_tile))
        print(rows[-1], flush=True)
        save()
    return vit_per_tile


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", default="1,7,13")
    p.add_argument("--server-tiles", default="", help="also the server's turn 2 at these tile counts (1, 7, 13)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=1, help="server chats per variant (median)")
    p.add_argument("--answer-tokens", type=int, default=4)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here (the docs render from it)")
    p.add_argument("--layers", type=int, default=None,
                   help="Keep only this many ViT and LLM layers (same widths): a preset sized for a CPU run.")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall seconds, or this process's CPU seconds (steadier on a shared machine)")
    a = p.parse_args()
    CLOCK[0] = CLOCKS[a.clock]
    preset = shallow(PRESET, a.layers) if a.layers else PRESET
    data = dict(preset=preset, dtype=a.dtype, clock=a.clock, prefill=[], server=[],
                command="python benchmarks/flash.py " + " ".join(sys.argv[1:]))

    def save():  # after every row: a long run that is stopped keeps what it measured
        if a.json:
            a.json.write_text(json.dumps(data, indent=1) + "\n")

    data["vit_per_tile_s"] = prefill_rows(preset, a.tiles, a.dtype, data["prefill"], save)
    for n in filter(None, a.server_tiles.split(",")):
        runs = {k: server_turn2(preset, int(n), a.dtype, k == "on", a.answer_tokens, a.repeats) for k in ("off", "on")}
        data["server"].append(dict(tiles=int(n), **runs))
        print(data["server"][-1], flush=True)
        save()
    print(markdown(data))


if __name__ == "__main__":
    main()
