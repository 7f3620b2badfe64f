"""Score tables as JSON and Markdown, and a small SVG bar chart of them (no plotting library needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

from mlx_internvl.evaluation.scoring import Scores


def _fmt(v: float) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else (f"{v:.2f}" if isinstance(v, float) else str(v))


def markdown_table(header: Sequence[str], rows: List[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def scores_markdown(scores: Scores) -> str:
    title = f"**{scores.benchmark}** ({scores.metric}, {len(scores.items)} questions)\n\n"
    return title + markdown_table(["", "score"], list(scores.table.items()))


def bar_chart_svg(table: Dict[str, float], title: str) -> str:
    """Horizontal bars, one per entry of `table` (scores in percent); OCRBench's counts are left out."""
    entries = [(k, v) for k, v in table.items() if isinstance(v, float) and not math.isnan(v) and 0 <= v <= 100]
    width, bar_h, left = 640, 22, 260
    height = 40 + bar_h * len(entries)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="13"><text x="8" y="20" font-weight="bold">{_escape(title)}</text>']
    for i, (k, v) in enumerate(entries):
        y = 32 + i * bar_h
        w = (width - left - 60) * v / 100
        parts.append(f'<text x="8" y="{y + 15}">{_escape(k)}</text><rect x="{left}" y="{y + 3}" width="{w:.1f}" '
                     f'height="{bar_h - 6}" fill="#4878a8"/><text x="{left + w + 6:.1f}" y="{y + 15}">{v:.1f}</text>')
    return "".join(parts) + "</svg>\n"


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_scores(scores: Scores, json_path: Path, md_path: Path) -> None:
    payload = {"benchmark": scores.benchmark, "metric": scores.metric, "questions": len(scores.items),
               "table": scores.table}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path.write_text(scores_markdown(scores))
    md_path.with_suffix(".svg").write_text(bar_chart_svg(scores.table, scores.benchmark))
