"""Structured output cost: grammar mask time per token on a 150k vocabulary, llguidance vs xgrammar, and decode
tokens/s with vs without a JSON Schema, in one run.

Mask time: both engines are built from the same Qwen2.5 tokenizer (tests/fixtures, 151,643 tokens plus
InternVL's, 151,674 logits as in InternVL2.5/3), compile the same schema with the same layout (`", "` / `": "`, no
other whitespace), and walk the same token sequences (the tokenizer's encoding of documents that fit the schema):
at every step the engine fills the bitmask of allowed tokens, then consumes the next token. Reported: median and
p90 of the fill time, the consume time, the grammar compile time and the tokenizer build time. `ours` is the whole
`structured.JsonConstraint` step (fill + unpacking the bitmask and masking the MLX logits).

Decode: the `internvl2_5-1b` language model (real widths and vocabulary, random weights, `--layers` of its 24
layers) runs mlx-lm's `generate_step` after the same prompt, with the schema's constraint and without, for the same
number of tokens; the sides alternate per repeat.

    python benchmarks/grammar_mask.py --repeats 3 --decode-repeats 3 --layers 4
"""

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_internvl.bench.presets import PRESETS, VIT_300M, random_model
from mlx_internvl.structured import JsonConstraint, ResponseFormat, compile_grammar, ll_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = PRESETS["internvl2_5-1b"]["llm"]["vocab_size"]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 120},
        "objects": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
            "type": "object", "additionalProperties": False, "required": ["label", "count", "box"],
            "properties": {"label": {"type": "string", "maxLength": 24}, "count": {"type": "integer", "minimum": 1},
                           "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                                   "minItems": 4, "maxItems": 4}}}},
        "scene": {"enum": ["indoor", "outdoor", "unknown"]},
        "people": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["caption", "objects", "scene", "people"],
    "additionalProperties": False,
}
DOCS = [
    {"caption": "A red panda sleeps on a branch above a wooden walkway.", "objects": [
        {"label": "red panda", "count": 1, "box": [120, 80, 610, 540]},
        {"label": "branch", "count": 2, "box": [0, 300, 1000, 700]}], "scene": "outdoor", "people": 0},
    {"caption": "Two people cook at a stove; pans, a kettle and 3 cups on the counter.", "objects": [
        {"label": "person", "count": 2, "box": [50, 20, 700, 990]}, {"label": "kettle", "count": 1,
                                                                       "box": [720, 400, 860, 600]},
        {"label": "cup", "count": 3, "box": [600, 650, 980, 800]}], "scene": "indoor", "people": 2},
]


def tokenizer():
    """The Qwen2.5 tokenizer with InternVL's tokens added as InternVL's training code adds them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "tests" / "fixtures" / "tokenizers" / "qwen2_5"))
    tok.add_tokens(INTERNVL_TOKENS, special_tokens=True)
    return tok


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def walk(fill, consume, sequences, repeats):
    fills, consumes = [], []
    for _ in range(repeats):
        for start, ids in sequences:
            state = start()
            for t in ids:
                fills.append(timed(fill, state)[1])
                consumes.append(timed(consume, state, t)[1])
    return fills, consumes


def summary(fills, consumes, **extra):
    ms = sorted(1e3 * f for f in fills)
    return dict(extra, steps=len(ms), fill_ms_median=statistics.median(ms), fill_ms_mean=statistics.mean(ms),
                fill_ms_p90=ms[int(0.9 * len(ms))], fill_ms_max=ms[-1],
                consume_ms_median=statistics.median(1e3 * c for c in consumes))


def bench_llguidance(tok, end, sequences, repeats):
    import llguidance.numpy as llnp

    lltok, build = timed(lambda: ll_tokenizer(tok, VOCAB, [end]))
    grammar, comp = timed(lambda: compile_grammar(ResponseFormat(SCHEMA), lltok))
    mask = llnp.allocate_token_bitmask(1, lltok.vocab_size)
    starts = [(lambda: JsonConstraint(lltok, grammar, [end]).matcher, ids) for ids in sequences]
    fills, consumes = walk(lambda m: llnp.fill_next_token_bitmask(m, mask), lambda m, t: m.consume_token(t),
                           starts, repeats)
    logits = mx.zeros((1, VOCAB))
    ours = []
    for ids in sequences:
        rule = JsonConstraint(lltok, grammar, [end])
        context = mx.array([end])
        for t in ids:
            ours.append(timed(lambda r, c: mx.eval(r(c, logits)), rule, context)[1])
            context = mx.array([t])
    return summary(fills, consumes, tokenizer_build_s=build, compile_s=comp,
                   ours_step_ms_median=statistics.median(1e3 * s for s in ours))


def bench_xgrammar(tok, end, sequences, repeats):
    try:
        import xgrammar as xgr
    except ImportError as e:
        return {"skipped": f"xgrammar is not installed ({e})"}
    info, build = timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB, stop_token_ids=[end]))
    compiler = xgr.GrammarCompiler(info)
    compiled, comp = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                separators=(", ", ": ")))
    mask = xgr.allocate_token_bitmask(1, VOCAB)
    starts = [(lambda: xgr.GrammarMatcher(compiled), ids) for ids in sequences]
    fills, consumes = walk(lambda m: m.fill_next_token_bitmask(mask), lambda m, t: m.accept_token(t), starts,
                           repeats)
    return summary(fills, consumes, tokenizer_build_s=build, compile_s=comp)


def decode(tok, end, repeats, layers, prompt_len=64):
    """Tokens/s of generate_step with and without the constraint, for the same token count, on the
    `internvl2_5-1b` language model cut to `layers` layers (the vocabulary and widths kept; a small ViT, unused)."""
    base = copy.deepcopy(PRESETS["internvl2_5-1b"])
    base["llm"]["num_hidden_layers"] = layers
    base["vision"] = dict(VIT_300M, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    PRESETS["grammar-decode"] = base
    model = random_model("grammar-decode")
    lltok = ll_tokenizer(tok, VOCAB, [end])
    grammar = compile_grammar(ResponseFormat(SCHEMA), lltok)
    prompt = mx.array(tok.encode("Describe the picture as JSON. " * 8)[:prompt_len])
    rows = {"constrained": [], "free": []}
    n = 32
    for r in range(repeats):
        for side in (("constrained", "free") if r % 2 == 0 else ("free", "constrained")):
            procs = [JsonConstraint(lltok, grammar, [end])] if side == "constrained" else None
            steps = generate_step(prompt, model, max_tokens=n + 1, logits_processors=procs)
            next(steps)
            t = time.perf_counter()
            k = sum(1 for _ in steps)
            rows[side].append(k / (time.perf_counter() - t))
    free, cons = statistics.median(rows["free"]), statistics.median(rows["constrained"])
    return {"layers": layers, "tokens": n, "free_tps": free, "constrained_tps": cons, "ratio": cons / free}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="Walks over the documents per engine.")
    ap.add_argument("--decode-repeats", type=int, default=3, help="Decode runs per side (0 skips decoding).")
    ap.add_argument("--layers", type=int, default=24, help="Language-model layers in the decode run (24: the "
                                                           "real InternVL2.5-1B; fewer makes the mask a larger share).")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"grammar-mask-{platform.system().lower()}"
                                                                           f"-{platform.machine()}.json"))
    args = ap.parse_args()
    tok = tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    sequences = [tok.encode(json.dumps(d, ensure_ascii=False), add_special_tokens=False) + [end] for d in DOCS]
    result = {"vocab": VOCAB, "schema": SCHEMA, "tokens_per_walk": sum(len(s) for s in sequences),
              "llguidance": bench_llguidance(tok, end, sequences, args.repeats),
              "xgrammar": bench_xgrammar(tok, end, sequences, args.repeats)}
    if args.decode_repeats:
        result["decode"] = decode(tok, end, args.decode_repeats, args.layers)
    result["machine"] = f"{platform.system()} {platform.machine()}"
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "schema"}, indent=2))


if __name__ == "__main__":
    main()
