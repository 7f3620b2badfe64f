"""What JSON-constrained replies cost a running `mlx-internvl serve`, measured through its HTTP API with the `openai`
client on 127.0.0.1, in one run:

1. Decode: aggregate tokens/s of 8 concurrent streamed clients, all unconstrained, then all under a JSON Schema
   (each its own grammar), the sides alternating per repeat; plus the grammar's time per token inside the decode
   step (`structured.JsonConstraint`: the llguidance mask fill, unpacking it and masking the logits).
2. The first JSON request after start: while a plain stream decodes, one JSON request arrives; its latency and the
   plain stream's longest gap between two pieces (the grammar engine's tokenizer view is built at model load, so
   neither waits for it), and how long the server took to start.

A bench preset with random weights and the real Qwen2.5 tokenizer (151,674 logits, from the test fixtures), the
schema of `grammar_mask.py` (captions, labelled boxes, an enum, integer ranges).

    python benchmarks/structured_server.py --layers 2 --repeats 3 --decode-tokens 24 \
        --json benchmarks/results/structured-server-linux-cpu.json
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from grammar_mask import SCHEMA  # noqa: E402
from server_bench import make_server, shallow, throughput  # noqa: E402

from mlx_internvl import structured  # noqa: E402
from mlx_internvl.server import running  # noqa: E402
from server_util import user  # noqa: E402

FORMAT = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}}


class MaskClock:
    """Wall time spent inside `JsonConstraint.__call__` (on the generation thread), per call."""

    def __init__(self):
        self.times = []
        real = structured.JsonConstraint.__call__

        def timed(rule, tokens, logits):
            t = time.perf_counter()
            out = real(rule, tokens, logits)
            self.times.append(time.perf_counter() - t)
            return out

        structured.JsonConstraint.__call__ = timed


def decode(url, eos, a, clock) -> dict:
    rows = {"free": [], "json": []}
    for r in range(a.repeats):
        for side in (("free", "json") if r % 2 == 0 else ("json", "free")):
            kw = {"response_format": FORMAT} if side == "json" else {}
            start = len(clock.times)
            rows[side].append(throughput(url, a.clients, a.decode_tokens, eos, **kw))
            if side == "json":
                steps = clock.times[start:]
            print(f"{side}: {rows[side][-1]:.1f} tokens/s aggregate", flush=True)
    free, constrained = statistics.median(rows["free"]), statistics.median(rows["json"])
    ms = sorted(1e3 * t for t in steps)
    return dict(clients=a.clients, tokens=a.decode_tokens, free_tps=free, json_tps=constrained,
                ratio=constrained / free, free_runs=rows["free"], json_runs=rows["json"],
                mask_ms_median=statistics.median(ms), mask_ms_p90=ms[int(0.9 * len(ms))])


def first_json_request(url, eos) -> dict:
    """A plain stream runs; after its first piece the first JSON request of this server arrives."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    marks, started = [], threading.Event()

    def plain():
        for c in client.chat.completions.create(model="bench", messages=[user("Tell a long story.")], stream=True,
                                                max_tokens=48, logit_bias={str(t): -100.0 for t in eos}):
            if c.choices and c.choices[0].delta.content:
                marks.append(time.perf_counter())
                started.set()

    thread = threading.Thread(target=plain)
    thread.start()
    started.wait()
    t = time.perf_counter()
    client.chat.completions.create(model="bench", messages=[user("Describe the scene.")], response_format=FORMAT,
                                   max_tokens=16)
    latency = time.perf_counter() - t
    thread.join()
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return dict(json_latency_s=latency, plain_max_gap_s=max(gaps), plain_median_gap_s=statistics.median(gaps))


def markdown(data: dict) -> str:
    d, f = data["decode"], data["first"]
    return "\n".join([
        f"| {d['clients']} concurrent clients ({d['tokens']} tokens each, streamed) | aggregate decode tokens/s |",
        "|---|---|",
        f"| no `response_format` | {d['free_tps']:.1f} |",
        f"| each under a JSON Schema (its own grammar) | {d['json_tps']:.1f} ({d['ratio']:.2f}x) |",
        "",
        f"Medians of {data['repeats']} alternating runs per side; each run's JSON/plain ratio: "
        + ", ".join(f"{j / f:.2f}x" for f, j in zip(d.get("free_runs", []), d.get("json_runs", [])))
        + " (the spread is the shared machine's load).",
        "",
        f"Grammar time per token inside the decode step: {d['mask_ms_median']:.2f} ms median, "
        f"{d['mask_ms_p90']:.2f} ms p90 per constrained row. The server's first JSON request, sent while a plain "
        f"stream decodes: {f['json_latency_s']:.2f} s for 16 tokens; the plain stream's longest gap between two "
        f"pieces meanwhile {f['plain_max_gap_s']:.2f} s (median {f['plain_median_gap_s']:.2f} s); the server "
        f"started in {data['start_s']:.1f} s (the tokenizer's grammar view included).",
        "",
        f"Preset `{data['preset']}` ({data['dtype']}), random weights, "
        f"{data['vocab']:,}-token vocabulary, on {data['machine']}."])


def main():
    import platform

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="internvl2_5-1b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=None, help="Keep only this many ViT and LLM layers (same widths).")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="Decode runs per side (0: only the first JSON request).")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here (the docs render from it)")
    a = p.parse_args()
    preset = shallow(a.preset, a.layers) if a.layers else a.preset
    clock = MaskClock()
    t = time.perf_counter()
    app = make_server(preset, a.dtype, max_tiles=1, max_tokens=a.decode_tokens)
    data = dict(preset=preset, dtype=a.dtype, repeats=a.repeats, start_s=time.perf_counter() - t,
                vocab=app.state.engine.model.config.llm_config["vocab_size"],
                machine=f"{platform.system()} {platform.machine()}")
    eos = sorted(app.state.engine.processor.tokenizer.eos_token_ids)
    with running(app) as url:
        data["first"] = first_json_request(url, eos)
        print(f"started in {data['start_s']:.1f} s; first JSON request: {data['first']}", flush=True)
        if a.repeats:
            data["decode"] = decode(url, eos, a, clock)
    if a.repeats:
        print(markdown(data))
    if a.json:
        a.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
