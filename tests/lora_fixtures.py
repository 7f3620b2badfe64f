"""Shared pieces of the LoRA tests: the synthetic colour task and a plain greedy decoder."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
QUESTION = "Color?"


def color_task(root: Path, n: int, tag: str, seed: int, size: int = 56) -> List[dict]:
    """`n` images of one large square or circle in one of four colours on white, and the InternVL-format jsonl
    `root/{tag}.jsonl` asking for the colour (empty system message, to keep sequences short)."""
    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        im = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(im)
        s = rnd.randint(size * 5 // 7, size - 2)
        x0, y0 = rnd.randint(0, size - s), rnd.randint(0, size - s)
        (d.rectangle if rnd.random() < 0.5 else d.ellipse)([x0, y0, x0 + s, y0 + s], fill=COLORS[name])
        im.save(root / f"{tag}{i}.png")
        lines.append({"image": f"{tag}{i}.png", "conversations": [
            {"from": "system", "value": ""},
            {"from": "human", "value": f"<image>\n{QUESTION}"},
            {"from": "gpt", "value": name}]})
    (root / f"{tag}.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return lines


def color_pairs(lines: List[dict], flip: bool = False) -> List[dict]:
    """Preference pairs of the colour task as TRL conversational rows (with the same empty system message): the
    right colour chosen and another one rejected (or, with `flip`, the other way round)."""
    names, out = list(COLORS), []
    for i, x in enumerate(lines):
        right = x["conversations"][-1]["value"]
        wrong = names[(names.index(right) + 1 + i % 3) % 4]
        chosen, rejected = (wrong, right) if flip else (right, wrong)
        out.append({"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": f"<image>\n{QUESTION}"}],
                    "chosen": chosen, "rejected": rejected, "images": [x["image"]]})
    return out


def greedy_answer(model, processor, image, question: str = QUESTION, max_tokens: int = 8) -> str:
    """Greedy decoding with the model's KV cache, from the prompt the Processor builds for inference."""
    import mlx.core as mx

    inputs = processor(question, images=[image], system_message="")
    cache = model.make_cache()
    logits = model(inputs["input_ids"], pixel_values=inputs["pixel_values"], cache=cache)
    out = []
    for _ in range(max_tokens):
        tok = int(mx.argmax(logits[0, -1]).item())
        if tok == processor.eos_token_id:
            break
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return processor.tokenizer.decode(out)
