"""Which benchmark is which: its dataset kind (the prompt it gets), its metric, its tile limit.

Names are VLMEvalKit's dataset names (`MMBench_DEV_EN`, `DocVQA_VAL`, ...) and are matched the way VLMEvalKit's
InternVL wrapper and datasets match them, by substring, so variants (`MMBench_DEV_CN_V11`, `DocVQA_TEST`) work.
To add a benchmark, put a `Family` in `FAMILIES` (or call `register`) naming its kind and metric; a new metric is
a function in `scoring.METRICS`. The tile limits are the wrapper's `set_max_num`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from mlx_internvl.errors import UserError


@dataclass(frozen=True)
class Family:
    pattern: str  # a substring of the dataset name, as VLMEvalKit's `listinstr` matches
    kind: str  # 'MCQ' (options A..), 'VQA' (open answer) or 'Caption' (the question as is)
    metric: str  # a key of scoring.METRICS


FAMILIES: List[Family] = [
    Family("MMBench", "MCQ", "circular"), Family("CCBench", "MCQ", "circular"),
    Family("MMStar", "MCQ", "choice"), Family("AI2D", "MCQ", "choice"), Family("SEEDBench", "MCQ", "choice"),
    Family("ScienceQA", "MCQ", "choice"), Family("MMMU", "MCQ", "mmmu"),
    Family("TextVQA", "VQA", "vqa_accuracy"), Family("DocVQA", "VQA", "anls"), Family("InfoVQA", "VQA", "anls"),
    Family("ChartQA", "VQA", "relaxed"), Family("OCRVQA", "VQA", "exact"), Family("GQA", "VQA", "exact"),
    Family("OCRBench", "VQA", "ocrbench"), Family("COCO", "Caption", "caption"),
]

# VLMEvalKit InternVLChat.set_max_num: tiles per image by dataset (substring match), else 6.
_TILES = [(12, ["ChartQA_TEST", "MMMU_DEV_VAL", "MMMU_TEST", "MME-RealWorld", "VCR_EN", "VCR_ZH", "OCRVQA", "BMMR"]),
          (18, ["DocVQA_VAL", "DocVQA_TEST", "DUDE", "MMLongBench_DOC", "SLIDEVQA"]),
          (24, ["InfoVQA_VAL", "InfoVQA_TEST", "OCRBench", "HRBench4K", "HRBench8K"])]
DEFAULT_TILES = 6
# The wrapper's cap on tiles over all images of one question.
TOTAL_TILES = 64


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str
    metric: str
    max_tiles: int

    @property
    def upscale_first_image(self) -> bool:
        """The wrapper doubles the first image's size (bilinear) for MMMU."""
        return "MMMU" in self.name

    def tiles_per_image(self, n_images: int) -> int:
        return max(1, min(self.max_tiles, TOTAL_TILES // max(n_images, 1)))


def register(family: Family) -> None:
    """Add a benchmark family (checked before the built-in ones, so it can override them)."""
    FAMILIES.insert(0, family)


def known_names() -> str:
    return ", ".join(f.pattern for f in FAMILIES)


def resolve(name: str) -> Benchmark:
    """The benchmark for a VLMEvalKit dataset name; a clear error for one we have no metric for."""
    family = next((f for f in FAMILIES if f.pattern in name), None)
    if family is None:
        raise UserError(f"--bench {name!r}: unknown benchmark; known (VLMEvalKit dataset names containing): "
                        f"{known_names()}. Pass the name as VLMEvalKit spells it, e.g. MMBench_DEV_EN or DocVQA_VAL")
    tiles = next((n for n, names in _TILES if any(x in name for x in names)), DEFAULT_TILES)
    return Benchmark(name, family.kind, family.metric, tiles)
