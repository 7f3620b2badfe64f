"""Caption metrics as VLMEvalKit scores COCO-style captioning (its `COCO_Caption_Scorer`): BLEU-1..4, ROUGE-L and
CIDEr from `pycocoevalcap`, on the raw reply and reference strings (no PTB tokenizer, no METEOR or SPICE), over
the whole set at once (CIDEr's document frequencies and BLEU's counts are corpus-wide), reported times 100.

The per-question scores (what `--compare` pairs) are each image's CIDEr, whose mean is the corpus CIDEr.
tests/fixtures/eval/scores.json holds VLMEvalKit's own results.
"""

from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Tuple

from mlx_internvl.errors import UserError

try:  # the `eval` extra
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
except ImportError:  # pragma: no cover - depends on the install
    Bleu = Cider = Rouge = None


def caption_scores(predictions: List[str], references: List[List[str]]) -> Tuple[List[float], Dict[str, float]]:
    """(each question's CIDEr, the table: Overall = CIDEr, Bleu_1..Bleu_4, ROUGE_L, CIDEr, in percent)."""
    if Bleu is None:
        raise UserError("caption metrics need pycocoevalcap: pip install 'mlx-internvl[eval]'")
    if any(not refs for refs in references):
        raise UserError("a caption question has no reference captions in its `answer` cell")
    res = {str(i): [p] for i, p in enumerate(predictions)}
    gts = {str(i): list(refs) for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, per_image = Cider().compute_score(gts, res)
    table = {"Overall": 100 * float(cider)}
    table.update({f"Bleu_{n + 1}": 100 * float(b) for n, b in enumerate(bleu)})
    table.update(ROUGE_L=100 * float(rouge), CIDEr=100 * float(cider))
    return [float(s) for s in per_image], table
