"""The loss curve: `loss.csv` (one row per report or validation) and `loss.png`, drawn with Pillow.

Pillow is already a dependency, so the plot needs no plotting library; it is a plain line chart of train and
validation loss against optimizer step. On resume, rows logged after the checkpoint being resumed are dropped, so
the file describes exactly the run whose adapters are on disk.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List

from PIL import Image, ImageDraw

from ..files import atomic_write, output_errors

FIELDS = ["step", "split", "loss", "learning_rate", "tokens_per_second", "peak_memory_gb"]


class LossLog:
    def __init__(self, directory: Path, enabled: bool = True, extra=()):
        self.fields = FIELDS + list(extra)  # extra columns: the preference metrics
        self.csv = Path(directory) / "loss.csv"
        self.png = Path(directory) / "loss.png"
        self.enabled = enabled

    def start(self, resume_step: int) -> None:
        """Start a new file, or on resume keep the rows up to `resume_step`."""
        if not self.enabled:
            return
        rows = [r for r in self.rows() if _step(r) <= resume_step] if resume_step else []

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)

        atomic_write(self.csv, write, "loss log")

    def add(self, **row) -> None:
        if not self.enabled:
            return
        with output_errors(self.csv, "loss log"), open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: row.get(k, "") for k in self.fields})

    def rows(self) -> List[Dict[str, str]]:
        if not self.csv.exists():
            return []
        with open(self.csv, newline="") as f:
            return [r for r in csv.DictReader(f) if _step(r) >= 0]

    def plot(self) -> None:
        if self.enabled:
            draw_curve(self.rows(), self.png)


def _step(row) -> int:
    """The row's step, -1 for a row a crash cut short (it is dropped)."""
    try:
        return int(row.get("step") or -1)
    except ValueError:
        return -1


def draw_curve(rows: List[Dict[str, str]], out: Path, size=(800, 480)) -> None:
    """Train (blue) and validation (orange) loss against step, with min/max labels on both axes."""
    series = {}
    for r in rows:
        try:
            series.setdefault(r["split"], []).append((int(r["step"]), float(r["loss"])))
        except (KeyError, ValueError):
            continue
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 70, 30, size[0] - 20, size[1] - 50
    d.rectangle([left, top, right, bottom], outline="black")
    points = [p for s in series.values() for p in s]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

        def xy(p):
            return (left + (p[0] - x0) / (x1 - x0) * (right - left), bottom - (p[1] - y0) / (y1 - y0) * (bottom - top))

        colors = {"train": (31, 119, 180), "val": (255, 127, 14)}
        for i, (name, pts) in enumerate(sorted(series.items(), key=lambda kv: kv[0] != "train")):
            color = colors.get(name, (0, 0, 0))
            if len(pts) > 1:
                d.line([xy(p) for p in pts], fill=color, width=2)
            for p in pts:
                x, y = xy(p)
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            d.text((right - 120, top + 10 + 16 * i), f"{name} loss", fill=color)
        d.text((left, bottom + 8), str(x0), fill="black")
        d.text((right - 40, bottom + 8), str(x1), fill="black")
        d.text((5, bottom - 10), f"{y0:.3g}", fill="black")
        d.text((5, top), f"{y1:.3g}", fill="black")
    d.text(((left + right) // 2 - 15, bottom + 25), "step", fill="black")
    atomic_write(out, lambda tmp: img.save(tmp, format="PNG"), "loss plot")
