"""`mlx-internvl serve` under the two loads that matter for a chat server, measured through its HTTP API with the
`openai` client on 127.0.0.1:

1. Turn-3 time to first token of a two-image chat, the whole history resent each turn (what every chat client
   does), with the prompt and image-feature caches on (the defaults) and off (`--prompt-cache-size 0
   --vision-cache-size 0`: every turn re-encodes both images and re-prefills the conversation, as upstream
   `chat(history=...)` does).
2. Aggregate decode tokens/s with 1, 4 and 8 concurrent clients (continuous batching), each asking for exactly
   `--decode-tokens` tokens (the end tokens are biased away so every reply has the same length).

A bench preset with random weights (the real Qwen2.5 tokenizer from the test fixtures, InternVL's tokens added),
real photos from the test fixtures. Medians of `--repeats`.

    python benchmarks/server_bench.py --preset internvl2_5-1b --max-tiles 1
    python benchmarks/server_bench.py --preset internvl2_5-1b --layers 6 --max-tiles 1 --repeats 1 \
        --json benchmarks/results/server-linux-cpu.json   # CPU-sized, the docs' figures
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from chat_reuse import processor_for  # noqa: E402

from mlx_internvl.bench.presets import random_model  # noqa: E402
from mlx_internvl.server import running  # noqa: E402
from mlx_internvl.server.app import ServerConfig, create_app  # noqa: E402
from mlx_internvl.server.engine import Engine  # noqa: E402
from server_util import IMG1, IMG2, user  # noqa: E402


def shallow(preset: str, layers: int) -> str:
    """A preset with the real widths but only `layers` ViT and LLM layers (a CPU-sized stand-in)."""
    import copy

    from mlx_internvl.bench.presets import PRESETS, VIT_300M

    p = copy.deepcopy(PRESETS[preset])
    p["vision"] = dict(p.get("vision", VIT_300M), num_hidden_layers=layers)
    p["llm"]["num_hidden_layers"] = layers
    name = f"{preset}-{layers}layers"
    PRESETS[name] = p
    return name


def make_server(preset, dtype, **cfg):
    def load():
        model = random_model(preset, getattr(mx, dtype))
        return model, processor_for(model)

    cfg = ServerConfig(model=preset, model_name="bench", **cfg)
    engine = Engine(load, decode_concurrency=cfg.decode_concurrency, prompt_cache_size=cfg.prompt_cache_size,
                    vision_cache_size=cfg.vision_cache_size, flash=cfg.flash)
    engine.start()
    return create_app(cfg, engine)


def ttft(client, messages, clock=time.perf_counter, **kw):
    """(seconds to the first content piece, usage) of a streamed request (`clock`: wall or this process's CPU)."""
    t, first, use = clock(), None, None
    for c in client.chat.completions.create(model="bench", messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **kw):
        if first is None and c.choices and c.choices[0].delta.content:
            first = clock() - t
        use = c.usage or use
    return first, use


def turn3(url, repeats, answer_tokens):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    times, uses = [], []
    for r in range(repeats):
        msgs = [user(f"Describe this photo ({r}).", IMG1)]
        for q in ([user("And this one?", IMG2)], [user("Which of the two is brighter?")]):
            reply = client.chat.completions.create(model="bench", messages=msgs, max_tokens=answer_tokens)
            msgs += [{"role": "assistant", "content": reply.choices[0].message.content}] + q
        t, use = ttft(client, msgs, max_tokens=2)
        times.append(t)
        uses.append(use)
    return statistics.median(times), uses[-1]


def throughput(url, clients, tokens, eos_ids, **kw):
    """Aggregate generated tokens/s of `clients` concurrent streamed requests (`kw`: more request fields, the same
    for each), over the window from the first client's first token to the last client's last token."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    marks = [None] * clients
    bias = {str(t): -100.0 for t in eos_ids}

    def one(i):
        first = last = None
        n = 0
        for c in client.chat.completions.create(model="bench", messages=[user(f"Client {i}: tell a long story.")],
                                                max_tokens=tokens, logit_bias=bias, stream=True,
                                                stream_options={"include_usage": True}, **kw):
            now = time.perf_counter()
            if c.choices and c.choices[0].delta.content is not None:
                first = first or now
                last = now
            if c.usage:
                n = c.usage.completion_tokens
        marks[i] = (first, last, n)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(m[0] for m in marks), max(m[1] for m in marks)
    return sum(m[2] for m in marks) / (end - start)


def markdown(data: dict) -> str:
    """The docs' two tables from what `main` measured (or the committed results file)."""
    off, on = data["turn3"]["caches off"], data["turn3"]["caches on"]
    out = ["| measure | caches off (`--prompt-cache-size 0 --vision-cache-size 0`) | caches on (default) |",
           "|---|---|---|",
           f"| turn-3 time to first token, two-image chat resent as full history ({on['prompt_tokens']}-token prompt) "
           f"| {off['ttft_s']:.1f} s ({off['cached_tokens']} cached) | **{on['ttft_s']:.2f} s** "
           f"({on['cached_tokens']} cached) — {off['ttft_s'] / on['ttft_s']:.0f}x |",
           "", "| concurrent clients (32 tokens each, streamed) | aggregate decode tokens/s | vs one client |",
           "|---|---|---|"]
    for r in data["throughput"]:
        out.append(f"| {r['clients']} | {r['tps']:.1f} | {r['vs_one']:.2f}x |")
    return "\n".join(out)


def measure(a) -> dict:
    common = dict(max_tiles=a.max_tiles, max_tokens=a.answer_tokens)
    data = dict(preset=a.preset, dtype=a.dtype, max_tiles=a.max_tiles, answer_tokens=a.answer_tokens, turn3={},
                throughput=[])
    for name, caches in (("caches off", dict(prompt_cache_size=0, vision_cache_size=0)), ("caches on", {})):
        app = make_server(a.preset, a.dtype, **common, **caches)
        with running(app) as url:
            t, use = turn3(url, a.repeats, a.answer_tokens)
            data["turn3"][name] = dict(ttft_s=t, prompt_tokens=use.prompt_tokens,
                                       cached_tokens=use.prompt_tokens_details.cached_tokens)
            print(f"turn-3 TTFT, {name}: {t:.3f} s", flush=True)
            if name == "caches on":
                eos = sorted(app.state.engine.processor.tokenizer.eos_token_ids)
                for n in (1, 4, 8):
                    tps = statistics.median(throughput(url, n, a.decode_tokens, eos) for _ in range(a.repeats))
                    base = data["throughput"][0]["tps"] if data["throughput"] else tps
                    data["throughput"].append(dict(clients=n, tps=tps, vs_one=tps / base))
                    print(f"decode, {n} concurrent client(s): {tps:.1f} tokens/s aggregate", flush=True)
    return data


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="internvl2_5-1b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tiles", type=int, default=1)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None,
                   help="Keep only this many ViT and LLM layers (same widths): a preset sized for a CPU run.")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here (the docs render from it)")
    a = p.parse_args()
    if a.layers:
        a.preset = shallow(a.preset, a.layers)
    print(f"preset {a.preset} ({a.dtype}), max_tiles {a.max_tiles}, {a.answer_tokens}-token answers")
    data = measure(a)
    print(markdown(data))
    if a.json:
        a.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
