"""Real benchmarks from local files in VLMEvalKit's TSV format.

A VLMEvalKit TSV has a header row and one tab-separated record per question: ``index``,
``image`` (a base64-encoded image; a row may instead hold the ``index`` of another row whose
image it shares, as MME's second question per image does), ``question``, options ``A``, ``B``,
... (empty cells mean "no such option"), ``answer``, ``category`` and benchmark-specific
columns (``hint``, ``l2-category``, ``split``, answer lists such as TextVQA's serialised as
``"['a', 'b', ...]"``, ...). Nothing is downloaded: the user points at files.

``load_tsv`` reads the records as dicts of strings (the image stays base64 until
``load_image`` decodes it), ``benchmark_name`` infers the benchmark from a file name and
``build_prompt`` makes the prompt each benchmark expects.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import os
import string
import sys
from pathlib import Path

__all__ = [
    "BENCHMARKS",
    "CAPTION_PROMPT",
    "benchmark_name",
    "build_prompt",
    "load_image",
    "load_tsv",
    "options",
    "parse_list",
    "resolve_benchmark",
    "task_type",
]

# Canonical benchmark name -> task type. File names may add a split suffix ("TextVQA_VAL").
BENCHMARKS: dict[str, str] = {
    "MME": "yorn",
    "POPE": "yorn",
    "HallusionBench": "yorn",
    "AI2D": "mcq",
    "RealWorldQA": "mcq",
    "MMStar": "mcq",
    "SEEDBench_IMG": "mcq",
    "SEEDBench2": "mcq",
    "SEEDBench2_Plus": "mcq",
    "ScienceQA": "mcq",
    "TextVQA": "vqa",
    "OCRVQA": "vqa",
    "ChartQA": "vqa",
    "OCRBench": "vqa",
    "COCO": "caption",
}

_REQUIRED_BY_TYPE: dict[str, tuple[str, ...]] = {
    "yorn": ("index", "image", "question", "answer"),
    "mcq": ("index", "image", "question", "answer", "A", "B"),
    "vqa": ("index", "image", "question", "answer"),
    "caption": ("index", "image", "answer"),
}
_EXTRA_REQUIRED: dict[str, tuple[str, ...]] = {
    "MME": ("category",),
    "OCRBench": ("category",),
}

YORN_SUFFIX = "Please answer yes or no."
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
VQA_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_PROMPT = (
    "Please describe this image in general. Directly provide the description, "
    'do not include prefix like "This image depicts". '
)

# A cell this short is a reference to another row's index, not image data (as in VLMEvalKit).
_MAX_REF_LEN = 64


def _known() -> str:
    return ", ".join(BENCHMARKS)


def resolve_benchmark(name: str) -> str:
    """The canonical benchmark name for ``name`` (e.g. "TextVQA_VAL" -> "TextVQA").

    A name matches a benchmark when it equals it or starts with it followed by "_"
    (case-insensitive); the longest match wins, so "SEEDBench2_Plus" is not "SEEDBench2".
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"benchmark must be a non-empty string; known benchmarks: {_known()}")
    low = name.strip().lower()
    best = None
    for canon in BENCHMARKS:
        c = canon.lower()
        if low == c or low.startswith(c + "_"):
            if best is None or len(canon) > len(best):
                best = canon
    if best is None:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {_known()}")
    return best


def benchmark_name(path: str | os.PathLike) -> str:
    """Infer the canonical benchmark from a TSV file name (``.../TextVQA_VAL.tsv`` -> TextVQA)."""
    stem = Path(path).name
    if stem.lower().endswith(".tsv"):
        stem = stem[: -len(".tsv")]
    try:
        return resolve_benchmark(stem)
    except ValueError:
        raise ValueError(
            f"cannot infer the benchmark from the file name {str(path)!r}; "
            f"known benchmarks: {_known()} (pass benchmark=... to load_tsv)"
        ) from None


def task_type(benchmark: str) -> str:
    """'yorn', 'mcq', 'vqa' or 'caption'."""
    return BENCHMARKS[resolve_benchmark(benchmark)]


def _set_csv_field_limit() -> None:
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32-bit on some platforms
            limit //= 10


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return value != value  # NaN
    s = str(value).strip()
    return s == "" or s.lower() == "nan"


def parse_list(value) -> list[str]:
    """An answer cell as a list of strings: ``"['a', 'b']"`` -> ["a", "b"], ``"a"`` -> ["a"]."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    if value is None:
        return []
    s = str(value).strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            parsed = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return [str(value)]
        if isinstance(parsed, list | tuple):
            return [str(v) for v in parsed]
    return [str(value)]


def options(row: dict) -> dict[str, str]:
    """The row's non-empty options in letter order: {"A": "cat", "B": "dog", ...}."""
    return {
        c: str(row[c]).strip()
        for c in string.ascii_uppercase
        if c in row and not _is_missing(row[c])
    }


def load_tsv(path: str | os.PathLike, benchmark: str | None = None) -> list[dict]:
    """Read a VLMEvalKit TSV file into a list of row dicts (cells as strings).

    ``benchmark`` defaults to the one named by the file (see ``benchmark_name``). Each row gets
    ``benchmark`` (canonical name), ``image`` (the base64 data, with references to another row
    resolved) and ``image_id`` (the index of the row that holds the image data, which pairs
    MME's two questions per image). Empty options are dropped. Images stay encoded until
    ``load_image(row)`` decodes them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VLMEvalKit TSV file not found: {str(path)!r}")
    bench = resolve_benchmark(benchmark) if benchmark is not None else benchmark_name(path)
    _set_csv_field_limit()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if not header:
            raise ValueError(f"{str(path)!r} is empty: expected a header row")
        header = [h.strip() for h in header]
        required = _REQUIRED_BY_TYPE[BENCHMARKS[bench]] + _EXTRA_REQUIRED.get(bench, ())
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(
                f"{str(path)!r} is missing required column(s) {missing} for benchmark {bench}; "
                f"columns present: {header}"
            )
        rows = []
        for cells in reader:
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{str(path)!r} line {reader.line_num}: {len(cells)} fields, "
                    f"the header has {len(header)}"
                )
            rows.append(dict(zip(header, cells, strict=True)))

    by_index: dict[str, str] = {}
    for row in rows:
        idx = row["index"].strip()
        row["index"] = idx
        if idx in by_index:
            raise ValueError(f"{str(path)!r}: duplicate index {idx!r}")
        by_index[idx] = row["image"]
    for row in rows:
        img = row["image"].strip()
        if len(img) <= _MAX_REF_LEN:
            target = by_index.get(img)
            if target is None or len(target.strip()) <= _MAX_REF_LEN:
                raise ValueError(
                    f"{str(path)!r}: row {row['index']!r} has image {img!r}, which is neither "
                    "image data nor the index of a row holding image data"
                )
            row["image"], row["image_id"] = target, img
        else:
            row["image_id"] = row["index"]
        for c in string.ascii_uppercase:
            if c in row and _is_missing(row[c]):
                del row[c]
        row["benchmark"] = bench
    return rows


def _decode(b64: str):
    from PIL import Image

    try:
        data = base64.b64decode(b64.strip(), validate=False)
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # any decoding failure is reported the same way
        raise ValueError(f"cannot decode base64 image data ({len(b64)} chars): {e}") from e
    return img.convert("RGB")


def load_image(row: dict):
    """Decode the row's image to an RGB ``PIL.Image`` (a list of them for multi-image rows)."""
    data = row.get("image")
    if data is None:
        raise ValueError(f"row {row.get('index')!r} has no image")
    s = data.strip()
    if s.startswith("[") and s.endswith("]"):
        return [_decode(x) for x in parse_list(s)]
    return _decode(s)


def build_prompt(benchmark: str, row: dict) -> str:
    """The text prompt the benchmark expects for ``row``."""
    bench = resolve_benchmark(benchmark)
    kind = BENCHMARKS[bench]
    if kind == "caption":
        return CAPTION_PROMPT
    question = str(row.get("question", "")).strip()
    if kind == "yorn":
        if question.lower().endswith(YORN_SUFFIX.lower()):
            return question
        return f"{question} {YORN_SUFFIX}"
    if kind == "vqa":
        return f"{question}\n{VQA_SUFFIX}"
    parts = []
    hint = row.get("hint")
    if not _is_missing(hint):
        parts.append(str(hint).strip())
    parts.append(question)
    parts.extend(f"{k}. {v}" for k, v in options(row).items())
    parts.append(MCQ_SUFFIX)
    return "\n".join(parts)
