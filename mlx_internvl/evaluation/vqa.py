"""Open-answer metrics as VLMEvalKit computes them: VQA accuracy (TextVQA) with the standard VQA answer
normalisation, ANLS (DocVQA, InfoVQA), relaxed accuracy (ChartQA), exact accuracy (OCRVQA, GQA), OCRBench hits.

Each function scores one question: `prediction` (the model's text) against `answers` (the list of references).
The rules follow VLMEvalKit's `vqa_eval.py` / `ocrbench.py` (itself from the official VQA evaluation), including
their quirks (e.g. punctuation handling decided on the raw text, ANLS length taken before whitespace folding);
tests/fixtures/eval/ holds scores computed by VLMEvalKit's own functions.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

_PUNCT = [';', r'/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!']
_COMMA_IN_NUMBER = re.compile(r'(\d)(,)(\d)')
_LONE_PERIOD = re.compile(r'(?<!\d)\.(?!\d)')
_ARTICLES = {'a', 'an', 'the'}
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
# The official VQA evaluation's table: an answer written without its apostrophe gets it back.
_CONTRACTIONS = dict(pair.split(':') for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's "
    "howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd "
    "itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't "
    "mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've "
    "neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at "
    "'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've "
    "shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd "
    "somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's "
    "someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll "
    "someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've "
    "somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've "
    "therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll "
    "theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've "
    "werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd "
    "wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's "
    "whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't "
    "wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll "
    "yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've "
    "you'dve:you'd've youll:you'll youre:you're youve:you've").split())


def _strip_punctuation(text: str) -> str:
    # A mark next to a space (or any text with a digit-comma-digit) is deleted, elsewhere it becomes a space.
    out = text
    number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        glued = (p + ' ' in text or ' ' + p in text) or number_comma
        out = out.replace(p, '' if glued else ' ')
    return _LONE_PERIOD.sub('', out)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return ' '.join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation: whitespace, punctuation, number words, articles, contractions."""
    answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
    return _digits_and_articles(_strip_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: for each reference, min(1, matches among the *other* references / 3); their mean."""
    refs = [normalize_answer(a) for a in answers]
    pred = normalize_answer(prediction)
    per_ref = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(per_ref) / len(per_ref)


def levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b):
        new = [j + 1]
        for i, ca in enumerate(a):
            new.append(row[i] if ca == cb else 1 + min(row[i], row[i + 1], new[-1]))
        row = new
    return row[-1]


def normalized_distance(reference: str, prediction: str) -> float:
    """Edit distance of the case- and whitespace-folded strings over the longer raw length."""
    ref = ' '.join(reference.strip().lower().split())
    pred = ' '.join(prediction.strip().lower().split())
    length = max(len(reference.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else levenshtein(ref, pred) / length


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question: the best similarity, 0 under `threshold`."""
    similarity = 1 - min(normalized_distance(a, prediction) for a in answers)
    return 0.0 if similarity < threshold else similarity


def _as_number(text: str) -> Optional[float]:
    try:
        return float(text.rstrip('%')) / 100.0 if text.endswith('%') else float(text)
    except ValueError:
        return None


def relaxed_match(reference: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's rule (pix2struct): numbers within 5% of a non-zero reference, else case-insensitive equality."""
    pred, ref = _as_number(prediction), _as_number(reference)
    if pred is not None and ref:
        return abs(pred - ref) / abs(ref) <= max_relative_change
    return prediction.lower() == reference.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    prediction = prediction.strip()
    return float(max(relaxed_match(a, prediction) for a in answers))


def exact_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """OCRVQA / GQA: case-insensitive equality after stripping, the best over the references."""
    pred = prediction.strip().lower()
    return max(1.0 if a.strip().lower() == pred else 0.0 for a in answers)


HMER = 'Handwritten Mathematical Expression Recognition'


def ocrbench_hit(prediction: str, answers: Sequence[str], category: str) -> int:
    """OCRBench: 1 when a reference occurs in the prediction (formulae: spaces removed; others: lower-cased)."""
    if category == HMER:
        def fold(s):
            return s.strip().replace('\n', ' ').replace(' ', '')
    else:
        def fold(s):
            return s.lower().strip().replace('\n', ' ')
    pred = fold(prediction)
    return int(any(fold(a) in pred for a in answers))


OCRBENCH_GROUPS = {
    'Text Recognition': ['Regular Text Recognition', 'Irregular Text Recognition', 'Artistic Text Recognition',
                         'Handwriting Recognition', 'Digit String Recognition', 'Non-Semantic Text Recognition'],
    'Scene Text-centric VQA': ['Scene Text-centric VQA'],
    'Doc-oriented VQA': ['Doc-oriented VQA'],
    'Key Information Extraction': ['Key Information Extraction'],
    HMER: [HMER],
}
