"""Benchmark files in, prediction files out.

Reads VLMEvalKit's TSVs (as its `ImageBaseDataset` reads them: pandas `read_csv(sep='\\t')`, base64 images, an
`image` cell of 64 characters or fewer naming the row whose image it shares, a list literal for several images)
and Hugging Face parquet exports (a file or a folder of shards; `image` / `image_1`.. cells holding
`{'bytes': ...}`; `answers` lists; `options` lists become `A`, `B`, ...).

Predictions are written in VLMEvalKit's layout (the input columns without `image`, plus `prediction`) as a TSV
quoted like its `dump`, one row appended per answered question, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import string
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from PIL import Image

from mlx_internvl.errors import UserError

try:  # the `eval` extra; only reading and writing benchmark files needs it
    import pandas
except ImportError:  # pragma: no cover - depends on the install
    pandas = None
from mlx_internvl.evaluation.choice import is_missing

IMAGE_COLUMNS = ("image",) + tuple(f"image_{k}" for k in range(1, 9))
INDEX_ALIASES = ("index", "questionId", "question_id", "id", "qid")


def _pandas():
    if pandas is None:
        raise UserError("reading benchmark files needs pandas and pyarrow: pip install 'mlx-internvl[eval]'")
    return pandas


def _as_list(value) -> list:
    """VLMEvalKit's `toliststr`: a cell holding a list literal is that list, anything else a one-item list."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        return [str(x) for x in ast.literal_eval(value)]
    return [value]


def _tsv_rows(path: Path) -> List[dict]:
    pd = _pandas()
    try:
        frame = pd.read_csv(path, sep="\t")
    except Exception as e:
        raise UserError(f"{path}: not a readable TSV ({e})") from e
    if "image" in frame:
        frame = frame[~pd.isna(frame["image"])]
    rows = frame.to_dict("records")
    if "image" in frame:
        images = {str(r["index"]): str(r["image"]) for r in rows}
        for r in rows:
            cell = images[str(r["index"])]
            if len(cell) <= 64:  # a reference to another question's image, to save space
                if len(images.get(cell, "")) <= 64:
                    raise UserError(f"{path}: row {r['index']}: image cell {cell!r} names no row with an image")
                cell = images[cell]
            r["image"] = _as_list(cell)
    return rows


def _parquet_rows(path: Path) -> List[dict]:
    pd = _pandas()
    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no .parquet files in this folder")
    rows = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).to_dict("records")
    for i, r in enumerate(rows):
        r["image"] = [r.pop(c) for c in IMAGE_COLUMNS if c in r and not is_missing(r[c])]
        if "index" not in r:
            r["index"] = next((r[a] for a in INDEX_ALIASES if a in r), i)
        if "answer" not in r and "answers" in r:
            r["answer"] = str([str(a) for a in r["answers"]])
        if "options" in r and "A" not in r:
            opts = r.pop("options")
            opts = ast.literal_eval(opts) if isinstance(opts, str) else list(opts)
            r.update(zip(string.ascii_uppercase, opts))
    return rows


def read_benchmark(path, default_question: Optional[str] = None) -> List[dict]:
    """The questions of a benchmark file, in file order, each a dict of its columns with `image` a list; a file
    without a `question` column gets `default_question` in one (as VLMEvalKit's captioning datasets do)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder")
    rows = _parquet_rows(path) if path.is_dir() or path.suffix == ".parquet" else _tsv_rows(path)
    if rows and default_question is not None and "question" not in rows[0]:
        for r in rows:
            r["question"] = default_question
    for c in ("index", "question"):
        if rows and c not in rows[0]:
            raise UserError(f"{path}: no {c!r} column; columns are {sorted(rows[0])}")
    seen = set()
    for r in rows:
        key = str(r["index"])
        if key in seen:
            raise UserError(f"{path}: index {key} appears twice; each question needs its own index")
        seen.add(key)
    return rows


def _is_file(text: str) -> bool:
    try:  # base64 of a picture is far longer than a path may be
        return len(text) < 4096 and Path(text).is_file()
    except OSError:
        return False


def image_bytes(value) -> bytes:
    """The encoded picture of a benchmark image cell (base64 text, raw bytes, `{'bytes': ...}` or a file path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and _is_file(value):
        return Path(value).read_bytes()
    try:
        return base64.b64decode(value) if isinstance(value, str) else bytes(value)
    except Exception as e:
        raise UserError(f"an image cell is neither a picture, base64 of one nor a file path ({e})") from e


def decode_image(value) -> Image.Image:
    """A benchmark image cell as an RGB image."""
    try:
        return Image.open(io.BytesIO(image_bytes(value))).convert("RGB")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"an image cell is neither a picture, base64 of one nor a file path ({e})") from e


def output_columns(rows: Sequence[dict]) -> List[str]:
    return [c for c in rows[0] if c != "image"] + ["prediction"]


def _cell(value) -> str:
    return "" if is_missing(value) else str(value)


class PredictionWriter:
    """Appends predictions to a TSV in VLMEvalKit's layout; knows which questions a previous run answered."""

    def __init__(self, path: Path, columns: List[str]):
        self.path, self.columns = Path(path), columns
        self.done: Dict[str, str] = {}
        if self.path.exists() and self.path.stat().st_size:
            self._resume()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append([columns])

    def _resume(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
        if records[0] != self.columns:
            raise UserError(f"{self.path} holds predictions for other data (columns {records[0]}); "
                            "pass another --out or delete the file to start over")
        complete = [r for r in records[1:] if len(r) == len(self.columns)]
        if not text.endswith("\n") or len(complete) != len(records) - 1:
            # The last row was cut off by an interrupt: rewrite without it.
            self.path.write_text("", encoding="utf-8")
            self._append([self.columns] + complete)
        self.done = {r[self.columns.index("index")]: r[-1] for r in complete}

    def _append(self, records) -> None:
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(records)
            f.flush()

    def write(self, row: dict, prediction: str) -> None:
        values = [_cell(row.get(c)) for c in self.columns[:-1]] + [prediction]
        self._append([values])
        self.done[str(row["index"])] = prediction


def read_predictions(path) -> List[dict]:
    """A predictions TSV as rows, the way VLMEvalKit loads one (pandas), with `prediction` kept as text."""
    pd = _pandas()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such predictions file")
    frame = pd.read_csv(path, sep="\t")
    if "prediction" in frame:
        # The reply verbatim: pandas would read "N/A", "None" or "null" as a missing value.
        frame["prediction"] = pd.read_csv(path, sep="\t", usecols=["prediction"], dtype=str, na_filter=False)
    return frame.to_dict("records")
