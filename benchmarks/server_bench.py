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
    python benchmarks/server_bench.py --preset internvl2_5-1b --layers 6 --max-tiles 1 --repeats 1   # CPU-sized
"""

import argparse
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
                    vision_cache_size=cfg.vision_cache_size)
    engine.start()
    return create_app(cfg, engine)


def ttft(client, messages, **kw):
    """(seconds to the first content piece, usage) of a streamed request."""
    t, first, use = time.perf_counter(), None, None
    for c in client.chat.completions.create(model="bench", messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **kw):
        if first is None and c.choices and c.choices[0].delta.content:
            first = time.perf_counter() - t
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


def throughput(url, clients, tokens, eos_ids):
    """Aggregate generated tokens/s of `clients` concurrent streamed requests, over the window from the first
    client's first token to the last client's last token."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    marks = [None] * clients
    bias = {str(t): -100.0 for t in eos_ids}

    def one(i):
        first = last = None
        n = 0
        for c in client.chat.completions.create(model="bench", messages=[user(f"Client {i}: tell a long story.")],
                                                max_tokens=tokens, logit_bias=bias, stream=True,
                                                stream_options={"include_usage": True}):
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
    a = p.parse_args()
    if a.layers:
        a.preset = shallow(a.preset, a.layers)
    common = dict(max_tiles=a.max_tiles, max_tokens=a.answer_tokens)
    print(f"preset {a.preset} ({a.dtype}), max_tiles {a.max_tiles}, {a.answer_tokens}-token answers")

    results = {}
    for name, caches in (("caches off", dict(prompt_cache_size=0, vision_cache_size=0)), ("caches on", {})):
        app = make_server(a.preset, a.dtype, **common, **caches)
        with running(app) as url:
            t, use = turn3(url, a.repeats, a.answer_tokens)
            results[name] = t
            print(f"turn-3 TTFT, {name}: {t:.3f} s (prompt {use.prompt_tokens} tokens, "
                  f"{use.prompt_tokens_details.cached_tokens} cached)", flush=True)
            if name == "caches on":
                eos = sorted(app.state.engine.processor.tokenizer.eos_token_ids)
                base = None
                for n in (1, 4, 8):
                    tps = statistics.median(throughput(url, n, a.decode_tokens, eos) for _ in range(a.repeats))
                    base = base or tps
                    print(f"decode, {n} concurrent client(s): {tps:.1f} tokens/s aggregate "
                          f"({tps / base:.2f}x one client)", flush=True)
    print(f"turn-3 TTFT speed-up from the caches: {results['caches off'] / results['caches on']:.1f}x")


if __name__ == "__main__":
    main()
