"""Second-turn time to first token in a chat: `ChatSession` (keeps the KV cache and the encoded image) vs asking
again from scratch with the history (what upstream `chat(..., history=...)` does: re-encode the image, re-prefill
the whole conversation). Full-size preset with random weights; the real Qwen2.5 tokenizer from the test fixtures
with InternVL's tokens added; a real photo.

    python benchmarks/chat_reuse.py --preset internvl2_5-1b --max-tiles 1 --repeats 3

Both sides produce the same prompt ids for turn 2 (checked), so the same logits; only the work differs.
The order of the two sides alternates between repeats; medians are reported.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx_internvl  # noqa: F401  (BLAS opt-in must precede mlx)

# isort: split
import mlx.core as mx

from mlx_internvl.bench.presets import random_model
from mlx_internvl.chat import ChatSession
from mlx_internvl.generate import stream_generate
from mlx_internvl.processing import Processor

ROOT = Path(__file__).resolve().parents[1]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def processor_for(model) -> Processor:
    from transformers import AutoTokenizer

    base = "qwen3" if model.config.llm_config.get("model_type") == "qwen3" else "qwen2_5"  # InternVL3.5: Qwen3's
    tok = AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/tokenizers" / base)
    tok.add_tokens(INTERNVL_TOKENS, special_tokens=True)
    tmp = tempfile.mkdtemp(prefix="mlx-internvl-chat-bench-")
    tok.save_pretrained(tmp)
    proc = Processor.from_pretrained(tmp, model.config)
    assert proc.image_token_id == model.config.image_token_id, (proc.image_token_id, model.config.image_token_id)
    return proc


def first_token_s(stream) -> float:
    """Seconds to the first streamed piece; the stream is run to its end so the session records the turn."""
    t = time.perf_counter()
    first = None
    for _ in stream:
        first = first or time.perf_counter() - t
    return first


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="internvl2_5-1b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tiles", type=int, default=1)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    model = random_model(a.preset, getattr(mx, a.dtype))
    proc = processor_for(model)
    photo = str(ROOT / "tests/fixtures/images/image1.jpg")
    q1, q2 = "Describe the image.", "What colours stand out?"

    times = {"ChatSession (reuse)": [], "from scratch (history)": []}
    for r in range(a.repeats):
        s = ChatSession(model, proc, max_tiles=a.max_tiles, max_tokens=a.answer_tokens)
        s.ask(q1, images=[photo])
        history = list(s.history)

        def reuse(s=s):
            return first_token_s(s.stream(q2, max_tokens=1))

        def scratch(history=history):
            return first_token_s(stream_generate(model, proc, q2, images=[photo], history=history,
                                                 max_tiles=a.max_tiles, max_tokens=1))

        sides = [("ChatSession (reuse)", reuse), ("from scratch (history)", scratch)]
        for name, fn in (sides if r % 2 == 0 else sides[::-1]):
            times[name].append(fn())
    # Same prompt both ways: the session's turn-2 ids are upstream's rendering of (history, q2).
    ref = proc(q2, images=[photo], history=history, max_tiles=a.max_tiles)["input_ids"][0].tolist()
    assert s._cache_ids[: len(ref)] == ref, "turn-2 prompt differs between the session and the from-scratch path"
    print(f"{a.preset} {a.dtype} {mx.default_device()} max_tiles {a.max_tiles}, turn-2 prompt {len(ref)} tokens")
    for name, ts in times.items():
        print(f"  {name:24s} turn-2 TTFT {statistics.median(ts):7.2f} s  (runs: {', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
