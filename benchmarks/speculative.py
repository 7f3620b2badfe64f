"""Speculative decoding and prompt-cache files on the full-size bench presets (random weights), in one run:

1. self-draft: a target preset in fp32 and its own language model quantized to 4 (and 8) bits in memory as the
   draft: draft acceptance rate, target forward passes per generated token, decode tok/s with and without;
2. draft model: an InternVL3-1B-shaped draft for an InternVL3-2B-shaped target (same vocabulary): the same figures;
3. prompt cache: time to first token of a question about a photo (13 tiles by default), from scratch vs from a
   `cache-prompt` file (file creation and load times shown too), with the real Qwen2.5 tokenizer of the fixtures.

    MLX_INTERNVL_BLAS=openblas python benchmarks/speculative.py --json benchmarks/results/speculative-linux-cpu.json

Every decode run is greedy over `--tokens` new tokens after an image prompt (1 tile of random pixels, random text
ids), with no stop token, so all runs produce the same number of tokens. For each draft the bandwidth model of the
speedup on a memory-bound machine (a Mac) is printed beside the measurement: bytes read per generated token =
passes per token x (target LLM bytes + k x draft LLM bytes), against the target's bytes per token without a draft,
with the target in bf16 (the released checkpoints' dtype) and the draft as run.
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx

from mlx_internvl.bench.measure import prompt_ids
from mlx_internvl.bench.presets import PRESETS, random_model, weight_bytes
from mlx_internvl.generate import stream_generate
from mlx_internvl.prompt_cache import PromptCacheFile, save_prompt_cache_file
from mlx_internvl.speculative import Draft

ROOT = Path(__file__).resolve().parents[1]


def lm_bytes(model, bf16: bool = False) -> int:
    """Bytes one decode step reads from the language model (embedding table excluded); `bf16`: as if in bf16."""
    b = weight_bytes(model)
    return b // 2 if bf16 and model.language_model.model.norm.weight.dtype == mx.float32 else b


def decode(model, ids, feats, n_tokens, draft=None, draft_feats=None):
    """(tok/s after the first token, tokens) of a greedy run of `n_tokens` + 1 tokens."""
    from mlx_lm.generate import generate_step

    if draft is None:
        arr = mx.array(ids, dtype=mx.int32)
        embeds = model.get_input_embeddings(arr[None], image_features=feats)[0]
        steps = generate_step(arr, model, max_tokens=n_tokens + 1, input_embeddings=embeds)
    else:
        steps = draft.generate_step(model, ids, feats, draft_feats, max_tokens=n_tokens + 1)
    out = [next(steps)[0]]
    t = time.perf_counter()
    out += [s[0] for s in steps]
    return n_tokens / (time.perf_counter() - t), out


def expected_speedup(ppt: float, k: int, target_bytes: int, draft_bytes: int) -> float:
    return 1.0 / (ppt * (1 + k * draft_bytes / target_bytes))


def tokens_per_pass(alpha: float, k: int) -> float:
    """Tokens one target pass yields when each draft token is accepted with probability alpha (greedy rule)."""
    return (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1


def run_drafts(target_preset, drafts, n_tokens, k, repeats, echo, image: bool = True):
    """drafts: list of ("self", bits) or ("model", preset). The prompt: 32 random text ids around one image block
    of random pixels (`image`), or the 32 text ids alone."""
    model = random_model(target_preset, mx.float32)
    image_id = PRESETS[target_preset]["image_token_id"]
    ids = prompt_ids(image_id, 1, PRESETS[target_preset]["llm"]["vocab_size"])
    warm = ids[:8]
    pv = mx.random.normal((1, 448, 448, 3), key=mx.random.key(1)) if image else None
    if not image:
        ids = [t for t in ids if t < image_id - 2]
    feats = model.extract_feature(pv) if image else None
    mx.eval(feats)
    decode(model, warm, None, 4)  # warm-up
    plain_runs, plain_tokens = [], None
    rows = []
    built = []
    for kind, arg in drafts:
        if kind == "self":
            d = Draft.self_draft(model, bits=arg, num_draft_tokens=k)
            name = f"self-draft {arg}-bit"
        else:
            dm = random_model(arg, mx.float32, seed=1)
            d = Draft(dm, num_draft_tokens=k)
            name = f"{arg} draft (fp32)"
        dfeats = d.features(pv, feats)
        mx.eval(dfeats)
        decode(model, warm, None, 2, d, None)  # warm-up of the draft's kernels
        built.append((name, d, dfeats))
    runs = {name: [] for name, _, _ in built}
    stats = {}
    for _ in range(repeats):
        tps, plain_tokens = decode(model, ids, feats, n_tokens)
        plain_runs.append(tps)
        echo(f"  plain {tps:.2f} tok/s")
        for name, d, dfeats in built:
            tps, toks = decode(model, ids, feats, n_tokens, d, dfeats)
            assert toks == plain_tokens, f"{name}: speculative greedy tokens differ from plain greedy"
            runs[name].append(tps)
            stats[name] = d.stats
            echo(f"  {name} {tps:.2f} tok/s, {d.stats.summary()}")
    t_bytes = lm_bytes(model, bf16=True)
    plain = statistics.median(plain_runs)
    rows.append(dict(target=target_preset, draft="none", decode_tps=plain, runs=plain_runs, acceptance=None,
                     passes_per_token=1.0, target_bf16_bytes=t_bytes))
    for name, d, _ in built:
        st = stats[name]
        d_bytes = lm_bytes(d.model, bf16=(d.kind == "model"))
        rows.append(dict(target=target_preset, draft=name, decode_tps=statistics.median(runs[name]), runs=runs[name],
                         acceptance=st.acceptance_rate, passes_per_token=st.passes_per_token, k=k,
                         proposed=st.proposed, accepted=st.accepted, generated=st.generated,
                         speedup_measured=statistics.median(runs[name]) / plain,
                         target_bf16_bytes=t_bytes, draft_bytes=d_bytes,
                         mac_model_speedup=expected_speedup(st.passes_per_token, k, t_bytes, d_bytes),
                         mac_model_at_alpha={a: expected_speedup(1 / tokens_per_pass(a, k), k, t_bytes, d_bytes)
                                             for a in (0.5, 0.7, 0.9)}))
    del model, built
    gc.collect()
    mx.clear_cache()
    return rows


def run_cache(preset, max_tiles, echo, repeats: int = 1):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chat_reuse import processor_for

    model = random_model(preset, mx.float32)
    proc = processor_for(model)
    photo = str(ROOT / "tests/fixtures/images/image1.jpg")
    q = "What colours stand out?"
    stream_generate(model, proc, "Hi", [photo], max_tiles=1, max_tokens=1).__next__()  # warm-up

    def first(**kw):
        t = time.perf_counter()
        piece = next(stream_generate(model, proc, q, [photo], max_tiles=max_tiles, max_tokens=1, **kw))
        return time.perf_counter() - t, piece

    scratch_s, p_scratch = first()
    echo(f"  from scratch: TTFT {scratch_s:.2f} s ({p_scratch.prompt_tokens} prompt tokens)")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "photo.safetensors"
        t = time.perf_counter()
        save_prompt_cache_file(model, proc, f, "", [photo], max_tiles=max_tiles)
        create_s = time.perf_counter() - t
        size = f.stat().st_size
        t = time.perf_counter()
        pcf = PromptCacheFile.load(f, model)
        load_s = time.perf_counter() - t
        runs = [first(prompt_cache_file=pcf) for _ in range(repeats)]
        cached_s, p_cached = statistics.median(r[0] for r in runs), runs[0][1]
    assert p_cached.token == p_scratch.token, "the first token differs between the cached and the scratch path"
    tiles = p_scratch.num_tiles
    echo(f"  cache file: create {create_s:.2f} s, {size / 1e6:.0f} MB, load {load_s:.2f} s, "
         f"TTFT {cached_s:.2f} s ({p_cached.prompt_tokens} new tokens)")
    row = dict(preset=preset, tiles=sum(tiles), prompt_tokens=p_scratch.prompt_tokens, ttft_scratch_s=scratch_s,
               cache_create_s=create_s, cache_file_mb=size / 1e6, cache_load_s=load_s, ttft_cached_s=cached_s,
               new_tokens_cached=p_cached.prompt_tokens, ttft_cached_incl_load_s=cached_s + load_s,
               cached_runs_s=[r[0] for r in runs])
    return row


def markdown(res) -> str:
    """The docs' tables (drafts, then the prompt-cache row) from one run's results (or a committed results file)."""
    out = drafts_markdown(res["drafts"]) if res.get("drafts") else ""
    if res.get("cache"):
        out += ("\n\n" if out else "") + cache_markdown([res["cache"]])
    return out


def drafts_markdown(drafts) -> str:
    out = ["| target | draft | decode tok/s | vs no draft | acceptance | target passes / token | bandwidth model on a "
           "Mac, at the measured acceptance | at acceptance 0.5 / 0.7 / 0.9 |", "|---|---|---|---|---|---|---|---|"]
    for r in drafts:
        if r["draft"] == "none":
            out.append(f"| {r['target']} | none | {r['decode_tps']:.2f} | 1.00x | – | 1.00 | – | – |")
            continue
        at = r["mac_model_at_alpha"]
        out.append(f"| {r['target']} | {r['draft'].replace(' draft', '')} | {r['decode_tps']:.2f} | "
                   f"{r['speedup_measured']:.2f}x | {r['acceptance']:.0%} ({r['accepted']}/{r['proposed']}) | "
                   f"{r['passes_per_token']:.2f} | {r['mac_model_speedup']:.2f}x | "
                   + " / ".join(f"{at[a]:.2f}x" for a in at) + " |")
    return "\n".join(out)


def cache_markdown(rows) -> str:
    """One row per prompt-cache run (the docs gather several runs' files), by number of tiles."""
    def s(x):
        return f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"
    out = ["| tiles | prompt tokens | TTFT from scratch | `cache-prompt`: time / file / load | TTFT from the file "
           "(new tokens) |", "|---|---|---|---|---|"]
    for c in sorted(rows, key=lambda c: c["tiles"]):
        runs = len(c.get("cached_runs_s", [])) or 1
        new = f"{c['new_tokens_cached']}" + (f"; median of {runs}" if runs > 1 else "")
        out.append(f"| {c['tiles']} | {c['prompt_tokens']} | {c['ttft_scratch_s']:.1f} s | "
                   f"{c['cache_create_s']:.1f} s / {c['cache_file_mb']:.0f} MB / {c['cache_load_s']:.2f} s | "
                   f"**{s(c['ttft_cached_s'])}** ({new}) |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="self,pair,cache", help="comma-separated: self, pair, cache")
    p.add_argument("--target", default="internvl2_5-1b", help="target preset of the self-draft part")
    p.add_argument("--self-bits", default="4,8")
    p.add_argument("--self-prompt", choices=["text", "image"], default="text",
                   help="prompt of the self-draft part: text (32 ids; MLX's CPU quantized matmul makes a 4-bit "
                        "prefill of an image prompt take minutes) or image (1 tile)")
    p.add_argument("--pair", default="internvl3-2b:internvl3-1b", help="target:draft presets")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--k", type=int, default=3, help="draft tokens per target pass")
    p.add_argument("--repeats", type=int, default=1, help="decode runs per draft; cached-TTFT runs (median)")
    p.add_argument("--cache-preset", default="internvl2_5-1b")
    p.add_argument("--max-tiles", type=int, default=12, help="12 gives 13 tiles for the 1000x747 photo")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    a = p.parse_args()
    parts = a.parts.split(",")
    res = {"device": str(mx.default_device()), "mlx": mx.__version__, "tokens": a.tokens, "args": vars(a)}
    echo = lambda s: print(s, flush=True)  # noqa: E731
    if "self" in parts:
        echo(f"[self-draft] {a.target}")
        res.setdefault("drafts", []).extend(run_drafts(a.target, [("self", int(b)) for b in a.self_bits.split(",")],
                                                       a.tokens, a.k, a.repeats, echo, a.self_prompt == "image"))
    if "pair" in parts:
        target, draft = a.pair.split(":")
        echo(f"[draft model] {draft} for {target}")
        res.setdefault("drafts", []).extend(run_drafts(target, [("model", draft)], a.tokens, a.k, a.repeats, echo))
    if "cache" in parts:
        echo(f"[prompt cache] {a.cache_preset}, max_tiles {a.max_tiles}")
        res["cache"] = run_cache(a.cache_preset, a.max_tiles, echo, a.repeats)
    table = markdown(res)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    if a.markdown:
        Path(a.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
