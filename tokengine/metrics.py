"""Official metrics of the real benchmarks, computed from rows with a ``prediction``.

``score(benchmark, rows)`` takes VLMEvalKit TSV records (see ``tokengine.data.vlmevalkit``)
each with the model's free-text ``prediction`` and returns the benchmark's metrics as a dict
with ``benchmark``, ``n``, ``primary`` (the key of the headline number) and the metrics.
Accuracy-like numbers are percentages (0-100) as VLMEvalKit reports them; the MME scores are
sums of (acc + acc+) * 100 per category; OCRBench's final score is a count (0-1000 on the full
benchmark); the COCO caption metrics are on pycocoevalcap's scale (BLEU and ROUGE-L in [0, 1],
CIDEr-D around 1 for good captions).

The rules follow VLMEvalKit and the benchmarks' own evaluators; answer extraction is
rule-based only (no LLM judge), so an answer that the rules cannot read counts as wrong.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

from tokengine.data.vlmevalkit import (
    BENCHMARKS,
    options,
    parse_list,
    resolve_benchmark,
)

__all__ = [
    "bleu",
    "caption_metrics",
    "cider_d",
    "extract_choice",
    "extract_yes_no",
    "relaxed_correct",
    "rouge_l",
    "score",
    "tokenize_caption",
    "vqa_normalize",
    "vqa_score",
]

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)

OCRBENCH_CATEGORIES = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
_OCRBENCH_HME = "Handwritten Mathematical Expression Recognition"


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    s = str(value).strip()
    return s == "" or s.lower() == "nan"


def _pct(values: Iterable[float]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def _group_pct(rows: list[dict], correct: list[float], column: str) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for row, c in zip(rows, correct, strict=True):
        if column in row and not _missing(row[column]):
            groups[str(row[column])].append(c)
    return {k: _pct(v) for k, v in sorted(groups.items())}


# --------------------------------------------------------------------------- VQA normalisation
# The VQA evaluation's answer normalisation (Antol et al.; as in VLMEvalKit's vqa_eval).
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<"]
_VQA_PUNCT += ["@", "`", ",", "?", "!"]
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern "(?!<=\d)(\.)(?!\d)" only constrains what follows the period.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "id've": "i'd've",
    "i'dve": "i'd've",
    "im": "i'm",
    "ive": "i've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _COMMA_DIGITS.search(text) is not None
    for p in _VQA_PUNCT:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def vqa_normalize(answer) -> str:
    """The VQA answer normalisation: punctuation, lower case, number words -> digits,
    articles dropped, contractions restored ("dont" -> "don't")."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    words = []
    for w in text.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_score(prediction, answers: list[str]) -> float:
    """VQA accuracy of one prediction in [0, 1]: the mean over the leave-one-out subsets of the
    ground-truth answers (10 choose 9 for VQA/TextVQA) of min(1, #matches / 3)."""
    gts = [vqa_normalize(a) for a in answers]
    if not gts:
        raise ValueError("vqa_score needs at least one ground-truth answer")
    pred = vqa_normalize(prediction)
    matches = sum(g == pred for g in gts)
    accs = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------- yes / no
def extract_yes_no(text) -> str:
    """'Yes', 'No' or 'Unknown' from a free-text answer.

    VLMEvalKit's rule: after punctuation removal, "yes" among the words and no "no" -> Yes,
    and vice versa. When both or neither occur, an answer that starts with yes/no is read by
    its first word ("Yes, there is no cat but a dog" -> Yes); otherwise Unknown.
    """
    words = _process_punctuation(str(text).lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "Yes"
    if has_no and not has_yes:
        return "No"
    if words and words[0] in ("yes", "no"):
        return words[0].capitalize()
    return "Unknown"


def _gt_yes_no(answer) -> str:
    a = str(answer).strip().lower()
    if a in ("yes", "true", "1"):
        return "Yes"
    if a in ("no", "false", "0"):
        return "No"
    raise ValueError(f"yes/no ground truth must be Yes or No, got {answer!r}")


# --------------------------------------------------------------------------- multiple choice
_LETTER_ALONE = re.compile(r"[\s\(\[\*]*([A-Za-z])[\s\)\]\.\:\*]*")
# A letter after an answer phrase: "(b)", an upper-case "B", or a lower-case "b" that ends the
# phrase ("answer: b." / "answer is b)") - never the article in "the answer is a cat".
_LETTER = r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![A-Za-z0-9])|([a-z])(?=\s*[\)\.:,;]|\s*$))"
# Only the key words are case-insensitive; the letter's case matters (see _LETTER).
_ANSWER_IS = re.compile(
    r"(?i:\b(?:answer|choice|option)s?\b\s*(?:is|would be|should be|will be)?\s*"
    r"(?:[:=]\s*)?(?:the\s+)?(?:option|choice|letter)?)\s*\**\s*" + _LETTER
)
_LEADING = re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\]\.:](?:\s|$)")
_SPLIT_CHARS = ".()[],:;!*#{}\"'"


def _first_group(m: re.Match) -> str:
    return next(g for g in m.groups() if g)


def _norm_text(s: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(s).lower()).split())


def extract_choice(prediction, choices: dict[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None when it cannot be read.

    In order: the answer is a lone letter ("B", "(b)", "C."); an answer phrase ("The answer is
    (B).", "Answer: C. red", "correct option: D"; the last one counts); a leading letter marker
    ("b) cat", "A. red"); exactly one capital option letter standing alone as a word (the
    VLMEvalKit rule; "A" followed by a lower-case word is read as an article); finally the
    option text itself, when the answer equals one option's text or contains exactly one
    option's text (an option contained in another matched one, "red" in "dark red", is not
    counted).
    """
    text = str(prediction).strip()
    letters = {k.upper() for k in choices}
    if not text or not letters:
        return None

    m = _LETTER_ALONE.fullmatch(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()

    hits = [_first_group(m).upper() for m in _ANSWER_IS.finditer(text)]
    hits = [h for h in hits if h in letters]
    if hits:
        return hits[-1]

    m = _LEADING.match(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()

    mod = text
    for c in _SPLIT_CHARS:
        mod = mod.replace(c, " ")
    found = {w for w in mod.split() if len(w) == 1 and w in letters}
    if "A" in found and re.search(r"(?<![A-Za-z])A\s+[a-z]", text):
        found.discard("A")
    if len(found) == 1:
        return found.pop()

    pred = _norm_text(text)
    texts = {k.upper(): _norm_text(v) for k, v in choices.items() if _norm_text(v)}
    exact = [k for k, v in texts.items() if v == pred]
    if len(exact) == 1:
        return exact[0]
    inside = [k for k, v in texts.items() if f" {v} " in f" {pred} "]
    inside = [k for k in inside if not any(o != k and texts[k] in texts[o] for o in inside)]
    if len(inside) == 1:
        return inside[0]
    return None


# --------------------------------------------------------------------------- ChartQA
def _to_float(text: str) -> float | None:
    t = text.strip()
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?%?", t):
        t = t.replace(",", "")
    try:
        value = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_correct(target, prediction, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy of one answer (pix2struct / VLMEvalKit): numbers are right
    within 5% relative error (inclusive; "x%" is read as x/100), anything else needs an exact
    case-insensitive match. Whitespace and a trailing period of the prediction are ignored and
    thousands separators ("1,234") are read as numbers."""
    pred = str(prediction).strip()
    if pred.endswith(".") and not pred.endswith(".."):
        pred = pred[:-1].strip()
    tgt = str(target).strip()
    p, t = _to_float(pred), _to_float(tgt)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return pred.lower() == tgt.lower()


# --------------------------------------------------------------------------- captions
def tokenize_caption(text) -> list[str]:
    """Simple caption tokenisation: lower case, punctuation removed (hyphens and apostrophes
    inside words kept), split on whitespace."""
    s = re.sub(r"[^\w\s'-]", " ", str(text).lower()).replace("_", " ")
    tokens = (w.strip("'-") for w in s.split())
    return [w for w in tokens if w]


def _ngram_counts(words: list[str], n: int = 4) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(refs: list[list[list[str]]], hyps: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised hypotheses against their references, as pycocoevalcap's
    BleuScorer computes it (clipped n-gram counts summed over the corpus, geometric mean,
    brevity penalty with the closest reference length per hypothesis)."""
    tiny, small = 1e-15, 1e-9
    guess, correct = [0] * n, [0] * n
    testlen = reflen = 0
    for ref_set, hyp in zip(refs, hyps, strict=True):
        maxref: Counter = Counter()
        for r in ref_set:
            for g, c in _ngram_counts(r, n).items():
                maxref[g] = max(maxref[g], c)
        lens = [len(r) for r in ref_set]
        testlen += len(hyp)
        reflen += min(lens, key=lambda length: (abs(length - len(hyp)), length))
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        for g, c in _ngram_counts(hyp, n).items():
            correct[len(g) - 1] += min(maxref.get(g, 0), c)
    scores, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(refs: list[list[list[str]]], hyps: list[list[str]], beta: float = 1.2) -> float:
    """Mean sentence ROUGE-L (F-measure with beta = 1.2 on the best precision and the best
    recall over the references), as pycocoevalcap's Rouge."""
    total = 0.0
    for ref_set, hyp in zip(refs, hyps, strict=True):
        if not hyp:
            continue
        lcs = [_lcs(r, hyp) for r in ref_set]
        prec = max(c / len(hyp) for c in lcs)
        rec = max(c / len(r) if r else 0.0 for c, r in zip(lcs, ref_set, strict=True))
        if prec and rec:
            total += (1 + beta**2) * prec * rec / (rec + beta**2 * prec)
    return total / len(hyps) if hyps else float("nan")


def cider_d(
    refs: list[list[list[str]]], hyps: list[list[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D as pycocoevalcap's CiderScorer: tf-idf n-gram vectors (n = 1..4, document
    frequencies over the references of this corpus), cosine similarity with the hypothesis
    counts clipped to the reference's, a Gaussian length penalty (sigma = 6; lengths counted
    as pycocoevalcap does, in bigrams), averaged over n and references, times 10.
    Returns (corpus mean, per-caption scores)."""
    ref_counts = [[_ngram_counts(r, n) for r in ref_set] for ref_set in refs]
    df: Counter = Counter()
    for ref_set in ref_counts:
        for g in {g for c in ref_set for g in c}:
            df[g] += 1
    log_n = math.log(float(len(refs))) if refs else 0.0

    def vec(counts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, df[g])))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    def sim(vh, nh, lh, vr, nr, lr) -> list[float]:
        delta = float(lh - lr)
        out = []
        for k in range(n):
            val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * math.exp(-(delta**2) / (2 * sigma**2)))
        return out

    scores = []
    for ref_set, hyp in zip(ref_counts, hyps, strict=True):
        vh, nh, lh = vec(_ngram_counts(hyp, n))
        total = [0.0] * n
        for rc in ref_set:
            vr, nr, lr = vec(rc)
            total = [a + b for a, b in zip(total, sim(vh, nh, lh, vr, nr, lr), strict=True)]
        scores.append(sum(total) / n / len(ref_set) * 10.0)
    return (sum(scores) / len(scores) if scores else float("nan")), scores


def caption_metrics(refs: list[list[str]], hyps: list[str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of captions ``hyps`` against reference lists ``refs``."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} reference lists for {len(hyps)} captions")
    if any(not r for r in refs):
        raise ValueError("every caption needs at least one reference")
    tref = [[tokenize_caption(r) for r in rs] for rs in refs]
    thyp = [tokenize_caption(h) for h in hyps]
    b = bleu(tref, thyp)
    out = {f"bleu_{k + 1}": b[k] for k in range(4)}
    out["rouge_l"] = rouge_l(tref, thyp)
    out["cider"] = cider_d(tref, thyp)[0]
    return out


# --------------------------------------------------------------------------- per benchmark
def _mme(rows: list[dict], correct: list[bool]) -> dict:
    stats: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for row, c in zip(rows, correct, strict=True):
        stats[str(row["category"])][_image_key(row)].append(c)
    cats = {}
    for cat, images in sorted(stats.items()):
        flat = [c for v in images.values() for c in v]
        acc = sum(flat) / len(flat)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        cats[cat] = {
            "acc": 100 * acc,
            "acc_plus": 100 * acc_plus,
            "score": 100 * (acc + acc_plus),
            "n": len(flat),
            "images": len(images),
        }
    perception = sum(cats[c]["score"] for c in MME_PERCEPTION if c in cats)
    cognition = sum(cats[c]["score"] for c in MME_COGNITION if c in cats)
    out = {
        "primary": "overall",
        "overall": perception + cognition,
        "perception": perception,
        "cognition": cognition,
        "acc": _pct(correct),
        "categories": cats,
    }
    absent = [c for c in MME_PERCEPTION + MME_COGNITION if c not in cats]
    unknown = [c for c in cats if c not in MME_PERCEPTION + MME_COGNITION]
    if absent:
        out["absent_categories"] = absent
    if unknown:
        out["unknown_categories"] = unknown
    return out


def _image_key(row: dict) -> str:
    for key in ("image_path", "image_id"):
        if key in row and not _missing(row[key]):
            return f"{key}:{row[key]}"
    if "image" in row and not _missing(row["image"]):
        return f"image:{hash(str(row['image']))}"
    return f"index:{row.get('index')}"


def _binary(truth: list[str], pred: list[str]) -> dict[str, float]:
    tp = sum(t == "Yes" and p == "Yes" for t, p in zip(truth, pred, strict=True))
    fp = sum(t == "No" and p == "Yes" for t, p in zip(truth, pred, strict=True))
    fn = sum(t == "Yes" and p != "Yes" for t, p in zip(truth, pred, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": 100 * f1,
        "acc": _pct(t == p for t, p in zip(truth, pred, strict=True)),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "yes_ratio": _pct(p == "Yes" for p in pred),
        "unknown": sum(p == "Unknown" for p in pred),
        "n": len(truth),
    }


def _pope(rows: list[dict], truth: list[str], pred: list[str]) -> dict:
    # A row may list several categories ("adversarial,popular"): as VLMEvalKit, count it once
    # per category, which restores the original per-split question sets.
    items = []
    for row, t, p in zip(rows, truth, pred, strict=True):
        cats = [c.strip() for c in str(row.get("category") or "").split(",") if c.strip()]
        for c in cats or [None]:
            items.append((c, t, p))
    out = {"primary": "f1"}
    out.update(_binary([t for _, t, _ in items], [p for _, _, p in items]))
    per = {}
    for cat in sorted({c for c, _, _ in items if c is not None}):
        sub = [(t, p) for c, t, p in items if c == cat]
        per[cat] = _binary([t for t, _ in sub], [p for _, p in sub])
    out["categories"] = per
    return out


def _hallusion_ids(row: dict) -> tuple[str, str, str]:
    if all(k in row and not _missing(row[k]) for k in ("set_id", "figure_id", "question_id")):
        return str(row["set_id"]), str(row["figure_id"]), str(row["question_id"])
    parts = str(row.get("index", "")).split("_")
    if len(parts) < 4:
        raise ValueError(
            "HallusionBench rows need set_id, figure_id and question_id columns or an index "
            f"ending in _<set_id>_<figure_id>_<question_id>; got index {row.get('index')!r}"
        )
    return parts[-3], parts[-2], parts[-1]


def _hallusion_group(row: dict) -> str:
    l2 = row.get("l2-category")
    if not _missing(l2):
        return str(l2)
    cat, sub = row.get("category"), row.get("subcategory")
    if not _missing(sub):
        return f"{cat}_{sub}" if not _missing(cat) else str(sub)
    return "" if _missing(cat) else str(cat)


def _hallusion_split(items: list[tuple[dict, bool]]) -> dict[str, float]:
    figures: dict[str, list[bool]] = defaultdict(list)
    questions: dict[str, list[bool]] = defaultdict(list)
    for row, c in items:
        set_id, figure_id, question_id = _hallusion_ids(row)
        group = _hallusion_group(row)
        figures[f"{group}_{set_id}_{figure_id}"].append(c)
        questions[f"{group}_{set_id}_{question_id}"].append(c)
    return {
        "aAcc": _pct(c for _, c in items),
        "fAcc": _pct(all(v) for v in figures.values()),
        "qAcc": _pct(all(v) for v in questions.values()),
        "n": len(items),
    }


def _hallusion(rows: list[dict], correct: list[bool]) -> dict:
    items = list(zip(rows, correct, strict=True))
    out = {"primary": "aAcc"}
    out.update(_hallusion_split(items))
    splits = {}
    for col in ("category", "l2-category"):
        values = sorted({str(r[col]) for r in rows if col in r and not _missing(r[col])})
        for v in values:
            splits[v] = _hallusion_split([(r, c) for r, c in items if str(r.get(col)) == v])
    out["splits"] = splits
    return out


def _yorn(bench: str, rows: list[dict]) -> dict:
    truth = [_gt_yes_no(r["answer"]) for r in rows]
    pred = [extract_yes_no(r["prediction"]) for r in rows]
    correct = [t == p for t, p in zip(truth, pred, strict=True)]
    if bench == "MME":
        return _mme(rows, correct)
    if bench == "POPE":
        return _pope(rows, truth, pred)
    return _hallusion(rows, correct)


def _mcq(rows: list[dict]) -> dict:
    correct, unparsed = [], 0
    for row in rows:
        opts = options(row)
        if not opts:
            raise ValueError(f"row {row.get('index')!r} has no options A, B, ...")
        gt = str(row["answer"]).strip()
        if gt.upper() not in opts:
            by_text = [k for k, v in opts.items() if v.strip().lower() == gt.lower()]
            if len(by_text) != 1:
                raise ValueError(
                    f"row {row.get('index')!r}: answer {gt!r} is neither an option letter "
                    f"({', '.join(opts)}) nor one option's text"
                )
            gt = by_text[0]
        pred = extract_choice(row["prediction"], opts)
        unparsed += pred is None
        correct.append(float(pred == gt.upper()))
    out = {"primary": "accuracy", "accuracy": _pct(correct), "unparsed": unparsed}
    for col, key in (("split", "splits"), ("category", "categories"), ("l2-category", "l2")):
        groups = _group_pct(rows, correct, col)
        if groups:
            out[key] = groups
    return out


def _answers(row: dict) -> list[str]:
    answers = parse_list(row["answer"])
    if not answers:
        raise ValueError(f"row {row.get('index')!r} has no ground-truth answer")
    return answers


def _vqa(bench: str, rows: list[dict]) -> dict:
    if bench == "OCRBench":
        return _ocrbench(rows)
    if bench == "ChartQA":
        hits = [float(any(relaxed_correct(a, r["prediction"]) for a in _answers(r))) for r in rows]
        out = {"primary": "relaxed_accuracy", "relaxed_accuracy": _pct(hits)}
    elif bench == "OCRVQA":
        # VLMEvalKit scores OCRVQA by exact case-insensitive match with any answer (not the VQA
        # score: with OCRVQA's single answers its leave-one-out average is always 0). The match
        # after the VQA normalisation (punctuation, articles, ...) is reported beside it.
        hits, norm = [], []
        for r in rows:
            pred, answers = str(r["prediction"]), _answers(r)
            hits.append(float(any(a.strip().lower() == pred.strip().lower() for a in answers)))
            p = vqa_normalize(pred)
            norm.append(float(any(vqa_normalize(a) == p for a in answers)))
        out = {"primary": "accuracy", "accuracy": _pct(hits), "normalized_accuracy": _pct(norm)}
    else:
        hits = [vqa_score(r["prediction"], _answers(r)) for r in rows]
        out = {"primary": "vqa_accuracy", "vqa_accuracy": _pct(hits)}
    for col, key in (("split", "splits"), ("category", "categories")):
        groups = _group_pct(rows, hits, col)
        if groups:
            out[key] = groups
    return out


def _ocrbench(rows: list[dict]) -> dict:
    counts = dict.fromkeys(OCRBENCH_CATEGORIES, 0)
    totals = dict.fromkeys(OCRBENCH_CATEGORIES, 0)
    for row in rows:
        cat = str(row["category"])
        counts.setdefault(cat, 0)
        totals[cat] = totals.get(cat, 0) + 1
        pred = str(row["prediction"])
        hme = cat == _OCRBENCH_HME or str(row.get("dataset_name", "")) == "HME100k"
        for a in _answers(row):
            if hme:
                hit = a.strip().replace("\n", " ").replace(" ", "") in (
                    pred.strip().replace("\n", " ").replace(" ", "")
                )
            else:
                hit = a.lower().strip().replace("\n", " ") in (
                    pred.lower().strip().replace("\n", " ")
                )
            if hit:
                counts[cat] += 1
                break
    final = sum(counts.values())
    return {
        "primary": "final_score",
        "final_score": final,
        "accuracy": 100.0 * final / len(rows),
        "text_recognition": sum(counts[c] for c in OCRBENCH_CATEGORIES[:6]),
        "categories": counts,
        "category_totals": totals,
    }


def _caption(rows: list[dict]) -> dict:
    refs = [_answers(r) for r in rows]
    hyps = [str(r["prediction"]) for r in rows]
    out = {"primary": "cider"}
    out.update(caption_metrics(refs, hyps))
    return out


def score(benchmark: str, rows: list[dict]) -> dict:
    """The benchmark's official metrics for ``rows`` (TSV records, each with a ``prediction``).

    Returns a dict with ``benchmark`` (canonical name), ``n``, ``primary`` (the key of the
    headline metric) and the metrics, e.g. MME: overall / perception / cognition and per
    category acc, acc_plus, score; POPE: f1, acc, precision, recall, yes_ratio overall and per
    category; HallusionBench: aAcc, fAcc, qAcc; multiple choice: accuracy (+ per category);
    TextVQA: vqa_accuracy; OCRVQA: accuracy (+ normalized_accuracy); ChartQA: relaxed_accuracy;
    OCRBench: final_score (+ per-category counts); COCO: bleu_1..4, rouge_l, cider.
    """
    bench = resolve_benchmark(benchmark)
    if not isinstance(rows, list | tuple):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    rows = list(rows)
    if not rows:
        raise ValueError(f"no rows to score for {bench}")
    need = ["prediction", "answer"] + (["category"] if bench in ("MME", "OCRBench") else [])
    for row in rows:
        absent = [k for k in need if k not in row or row[k] is None]
        if absent:
            raise ValueError(f"{bench} row {row.get('index')!r} lacks {absent}")
    kind = BENCHMARKS[bench]
    if kind == "yorn":
        out = _yorn(bench, rows)
    elif kind == "mcq":
        out = _mcq(rows)
    elif kind == "vqa":
        out = _vqa(bench, rows)
    else:
        out = _caption(rows)
    return {"benchmark": bench, "n": len(rows), **out}
