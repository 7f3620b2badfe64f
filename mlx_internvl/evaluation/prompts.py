"""The question InternVL is asked for a benchmark row, as VLMEvalKit's InternVL wrapper (`InternVLChat`, V2.0,
no chain-of-thought) builds it, and the images it is shown with their tile limits.

Multiple choice: hint, question, `A. ...` lines, then the instruction to answer with the letter (in Chinese when
the text has Chinese). Short-answer VQA: the question plus "Answer the question using a single word or phrase."
Captioning: the question as it is (VLMEvalKit's `CAPTION_QUESTION` when the file has none).
Images: one image is `<image>\\n` before the text; several are `Image-1: <image>\\n...` lines. The chat template
around it is the model's own (`Processor`). tests/fixtures/eval/prompts.json holds the wrapper's own output.
"""

from __future__ import annotations

import io
import re
from typing import List

from PIL import Image

from mlx_internvl.evaluation.benchmarks import Benchmark
from mlx_internvl.evaluation.choice import is_missing, options
from mlx_internvl.evaluation.data import decode_image, image_bytes

# VLMEvalKit's captioning datasets ask this when the benchmark file has no `question` column.
CAPTION_QUESTION = ('Please describe this image in general. Directly provide the description, '
                    'do not include prefix like "This image depicts". ')
_CHINESE = re.compile('[\u4e00-\u9fff]')
SHORT_ANSWER = '\nAnswer the question using a single word or phrase.'
LETTER = ("\nAnswer with the option's letter from the given choices directly.", '\n请直接回答选项字母。')
DIRECT = ('\nAnswer the question directly.', '\n请直接回答问题。')
# VQA datasets the wrapper asks for a detailed answer, or passes the question through unchanged.
_DETAILED = ['LLaVABench', 'WildVision']
_AS_IS = ['MathVerse', 'MathVista', 'MathVision', 'VCR', 'MTVQA', 'MMVet', 'MMDU', 'CRPE', 'MIA-Bench', 'MM-Math',
          'DynaMath', 'QSpatial', 'WeMath', 'LogicVista', 'MM-IFEval', 'ChartMimic', 'MMReason']


def multiple_choice_text(row: dict) -> str:
    question = row['question']
    hint = row.get('hint')
    if not is_missing(hint):
        question = hint + '\n' + question
    opts = options(row)
    for key, item in opts.items():
        question += f'\n{key}. {item}'
    chinese = _CHINESE.search(question) is not None
    return question + (LETTER if opts else DIRECT)[chinese]


def open_question_text(bench: Benchmark, row: dict) -> str:
    question = row['question']
    if any(x in bench.name for x in _DETAILED):
        return question + '\nAnswer this question in detail.'
    if any(x in bench.name for x in _AS_IS):
        return question
    return question + SHORT_ANSWER


def default_question(bench: Benchmark):
    """The question of a benchmark whose file may have no `question` column (captioning), else None."""
    return CAPTION_QUESTION if bench.kind == 'Caption' else None


def question_text(bench: Benchmark, row: dict, n_images: int) -> str:
    """The text handed to the model's chat(), image placeholders included."""
    if bench.kind == 'Caption':
        text = row['question']
    else:
        text = multiple_choice_text(row) if bench.kind == 'MCQ' else open_question_text(bench, row)
    if n_images == 1:
        return '<image>\n' + text
    return ''.join(f'Image-{i + 1}: <image>\n' for i in range(n_images)) + text


def _upscaled(image: Image.Image) -> Image.Image:
    return image.resize((image.width * 2, image.height * 2), Image.BILINEAR)


def row_images(bench: Benchmark, row: dict) -> List[Image.Image]:
    """The row's images, decoded; MMMU's first one doubled in size (bilinear) as the wrapper does."""
    images = [decode_image(v) for v in row.get('image') or []]
    if images and bench.upscale_first_image:
        images[0] = _upscaled(images[0])
    return images


def row_image_files(bench: Benchmark, row: dict) -> List[bytes]:
    """The row's images as files to send to a server: each cell's own bytes, except MMMU's upscaled first image,
    sent as PNG (lossless, so the server decodes the very pixels `row_images` gives)."""
    files = [image_bytes(v) for v in row.get('image') or []]
    if files and bench.upscale_first_image:
        buf = io.BytesIO()
        _upscaled(decode_image(files[0])).save(buf, format='PNG')
        files[0] = buf.getvalue()
    return files
