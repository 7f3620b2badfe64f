"""Multiple-choice scoring as VLMEvalKit does it without an LLM judge ("exact matching"): find the option letter
in the reply (`extract_choice`), circular evaluation for MMBench (a question counts only if every rotation of its
options is answered right), and MMMU's open questions recast as two-option ones.

Rows are dicts as read from a VLMEvalKit TSV: option columns `A`, `B`, ... (missing ones are None/NaN),
`answer` (a letter), `prediction`. tests/fixtures/eval/ holds results of VLMEvalKit's own functions.
"""

from __future__ import annotations

import math
import re
import string
from typing import Dict, List, Optional, Union

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", 'Cannot determine the answer')
_SEPARATORS = '.()[],:;!*#{}'
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
NO_ANSWER = 'Z'


def is_missing(value) -> bool:
    """pandas' idea of a missing cell (None or NaN), without needing pandas."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def options(row: dict) -> Dict[str, object]:
    """The row's options in letter order, missing ones left out."""
    return {c: row[c] for c in string.ascii_uppercase if c in row and not is_missing(row[c])}


def _letter(answer: str, choices: Dict[str, object]) -> Union[str, bool]:
    if 'Failed to obtain answer via API' in answer:
        return False
    if any(r in answer for r in REFUSALS):
        return NO_ANSWER
    words = answer
    for c in _SEPARATORS:
        words = words.replace(c, ' ')
    words = [w.strip() for w in words.split()]
    named = [c for c in choices if c in words]
    if len(named) == 1:
        # A lone letter counts only near the end of the reply (among its last four words).
        if words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and NO_ANSWER in words:
        return NO_ANSWER
    m = _ANSWER_IS.search(answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return False


def _option_text(answer: str, choices: Dict[str, object]) -> Union[str, bool]:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else False


def extract_choice(prediction, choices: Dict[str, object]) -> Union[str, bool]:
    """The option letter the reply names (or whose text it contains, if exactly one); 'Z' for a refusal or an
    explicit Z; False if none can be told."""
    prediction = str(prediction)
    return _letter(prediction, choices) or _option_text(prediction, choices)


def choice_hit(row: dict, answer: Optional[str] = None) -> int:
    """1 when the extracted letter equals the reference (`answer`, default the row's)."""
    ref = row['answer'] if answer is None else answer
    return int(extract_choice(row['prediction'], options(row)) == ref)


def mmmu_row(row: dict) -> dict:
    """VLMEvalKit's `MMMU_preproc`: an open question (no option A) becomes A = its answer, B = 'Other Answers';
    a reference that is not a capital letter is then taken as 'A'."""
    row = dict(row)
    if is_missing(row.get('A')):
        row['A'], row['B'] = row['answer'], 'Other Answers'
    ans = row['answer']
    row['answer'] = ans if isinstance(ans, str) and ans in string.ascii_uppercase and len(ans) == 1 else 'A'
    return row


CIRCULAR_OFFSET = 1_000_000


def circular_groups(rows: List[dict]) -> Dict[int, List[dict]]:
    """MMBench's circular copies: row `index` k + n * 1e6 is a rotation of question k. Groups keyed by the main
    question's index, each sorted by index (the main row first)."""
    groups: Dict[int, List[dict]] = {}
    for row in sorted(rows, key=lambda r: int(r['index'])):
        groups.setdefault(int(int(row['index']) % CIRCULAR_OFFSET), []).append(row)
    return {k: g for k, g in groups.items() if int(g[0]['index']) == k}


def circular_hit(group: List[dict]) -> int:
    """1 when every rotation's extracted letter equals its reference."""
    return int(all(choice_hit(r) for r in group))
