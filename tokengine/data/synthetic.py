"""Synthetic task suite: rendered scenes with question families of graded visual detail.

Every sample is a pure function of ``(family, seed, image_size)``. Scenes are drawn on a
square canvas of ``image_size`` pixels (default 336 = 24×24 patches of 14 px, LLaVA-1.5's
vision input; 96 or 192 work for small models) and the question families need different
amounts of visual detail, so that pooling the 24×24 patch grid to few tokens really loses the
information for the detail-heavy ones:

=============  ==========================================================  ==================
family         question (examples)                                         answers
=============  ==========================================================  ==================
existence      Is there a red triangle?  (adversarial negatives: the       yes / no (balanced)
               colour and the shape are both in the scene, not together)
colour         What colour is the shape in the top-left corner? /          8 colours
               What colour is the triangle?
shape          What shape is the blue object?                              5 shapes
counting       How many circles are there? / How many red shapes ...?      0 .. 12
spatial        Is the square to the left of the circle? /                  yes / no / left /
               Where is the square relative to the circle: ...?            right / above / below
small_object   What colour is the small dot?  (a dot of ~8 px at 336)      8 colours
text           What is the second character of the text?                   22 characters
chart          Which bar is the tallest? / What is the value of bar C?     A .. F, 1 .. 10
=============  ==========================================================  ==================

Determinism, across runs, machines and library versions:

- randomness comes only from ``random.Random(int)`` through its ``random()`` method, the one
  stream Python guarantees across versions (``randint``/``choice``/``shuffle`` are built on it
  here, not taken from the library);
- shapes are rasterised with exact integer arithmetic in NumPy (Pillow's own ellipse and
  polygon rasterisers have changed between releases), and characters come from a 5×7 bitmap
  font defined in this file, scaled by an integer factor: no FreeType, no anti-aliasing;
- the question and the answer are drawn before any size-dependent layout, so a seed gives the
  same question and answer at every ``image_size``.

Seeds: the test split uses seeds ``0 .. n_per_family-1`` of each family; the training stream
uses seeds from ``10**9`` upwards, so the two never share a scene. ``Sample.meta`` holds the
generator's ground truth (every object's kind, colour, shape, character, value, pixel bbox and
``id_grid``, the 24×24 map of which object covers each patch) for dense supervision;
:func:`dense_labels` turns it into per-patch label maps.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CHARSET",
    "COLOURS",
    "FAMILIES",
    "GRID",
    "SHAPES",
    "Sample",
    "answer_vocabulary",
    "asked_cells",
    "dense_labels",
    "generate",
    "iter_test_split",
    "normalize_answer",
    "render_examples_grid",
    "sample_hash",
    "split_hash",
    "test_split",
    "train_stream",
]

FAMILIES: tuple[str, ...] = (
    "existence",
    "colour",
    "shape",
    "counting",
    "spatial",
    "small_object",
    "text",
    "chart",
)

#: the vision grid (24×24 patches for LLaVA-1.5 at 336 px): ``meta["id_grid"]`` has this shape.
GRID = 24

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 230, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "purple": (140, 50, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "cross": "crosses"}  # fmt: skip
#: characters of the text family: upper-case letters and digits that cannot be confused.
CHARSET = "ACEFHKLMNPRTUWXY234679"
_ORDINALS = ("first", "second", "third", "fourth")
_BAR_LABELS = "ABCDEF"
MAX_COUNT = 12
MAX_BAR = 10

_TEST_SEED_LIMIT = 10**6
_TRAIN_SEED_BASE = 10**9

_VOCAB: dict[str, tuple[str, ...]] = {
    "existence": ("yes", "no"),
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "counting": tuple(str(i) for i in range(MAX_COUNT + 1)),
    "spatial": ("yes", "no", "left", "right", "above", "below"),
    "small_object": COLOUR_NAMES,
    "text": tuple(CHARSET),
    "chart": tuple(_BAR_LABELS) + tuple(str(i) for i in range(1, MAX_BAR + 1)),
}


@dataclass
class Sample:
    """One question about one rendered scene; ``answer`` is canonical (see ``normalize_answer``)."""

    image: Image.Image
    question: str
    answer: str
    family: str
    uid: str
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# randomness: only Random.random(), the stream Python guarantees across versions


class _Rng:
    def __init__(self, seed: int):
        self._r = random.Random(seed)

    def random(self) -> float:
        return self._r.random()

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self._r.random()

    def randint(self, a: int, b: int) -> int:
        """Uniform integer in [a, b], both ends included."""
        return a + int(self._r.random() * (b - a + 1))

    def choice(self, seq: Sequence):
        return seq[self.randint(0, len(seq) - 1)]

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.randint(0, i)
            items[i], items[j] = items[j], items[i]

    def sample(self, seq: Sequence, k: int) -> list:
        items = list(seq)
        self.shuffle(items)
        return items[:k]


# --------------------------------------------------------------------------------------------
# glyphs: a classic 5×7 bitmap font, so that text renders identically everywhere

_FONT_5X7 = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
}
_GLYPH_W, _GLYPH_H = 5, 7


@lru_cache(maxsize=256)
def _glyph(ch: str, scale: int) -> np.ndarray:
    rows = _FONT_5X7[ch].split("|")
    g = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    return np.repeat(np.repeat(g, scale, axis=0), scale, axis=1)


# --------------------------------------------------------------------------------------------
# shape masks: exact integer rasterisation, (2r+1)×(2r+1), centred


@lru_cache(maxsize=4096)
def _shape_mask(shape: str, r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    if shape == "circle":
        m = x * x + y * y <= r * r + r
    elif shape == "square":
        h = (r * 17 + 10) // 20  # ~0.85 r: about the visual weight of the circle
        m = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        # apex (0, -r), base corners (-r, r) and (r, r): inside all three half-planes
        left = 2 * r * x + r * (y + r) >= 0  # edge apex -> (-r, r)
        right = -2 * r * x + r * (y + r) >= 0  # edge apex -> (r, r)
        m = left & right & (y <= r)
    elif shape == "diamond":
        m = np.abs(x) + np.abs(y) <= r
    elif shape == "cross":
        t = max(1, (r + 1) // 3)
        m = ((np.abs(x) <= t) & (np.abs(y) <= r)) | ((np.abs(y) <= t) & (np.abs(x) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.ascontiguousarray(np.broadcast_to(m, (2 * r + 1, 2 * r + 1)))


# --------------------------------------------------------------------------------------------
# canvas


class _Canvas:
    """An RGB array plus an object-id map; objects are recorded with their ground truth."""

    def __init__(self, size: int, background: tuple[int, int, int]):
        self.size = size
        self.background = background
        self.rgb = np.empty((size, size, 3), dtype=np.uint8)
        self.rgb[:] = background
        self.ids = np.full((size, size), -1, dtype=np.int16)
        self.objects: list[dict] = []

    def px(self, v: float) -> int:
        return int(round(v * self.size))

    def _paste(self, x0: int, y0: int, mask: np.ndarray, colour, oid: int | None) -> tuple:
        h, w = mask.shape
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, self.size), min(y0 + h, self.size)
        if cx1 <= cx0 or cy1 <= cy0:
            return (cx0, cy0, cx0, cy0)
        m = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        self.rgb[cy0:cy1, cx0:cx1][m] = colour
        if oid is not None:
            self.ids[cy0:cy1, cx0:cx1][m] = oid
        return (cx0, cy0, cx1, cy1)

    def _add(self, obj: dict) -> int:
        obj["id"] = len(self.objects)
        self.objects.append(obj)
        return obj["id"]

    def shape(self, shape: str, colour: str, cx: float, cy: float, r: float, min_r: int = 2):
        """A shape of normalised centre (cx, cy) and half-size r."""
        rp = max(min_r, self.px(r))
        x, y = self.px(cx), self.px(cy)
        obj = {"kind": "shape", "shape": shape, "colour": colour}
        oid = self._add(obj)
        mask = _shape_mask(shape, rp)
        bbox = self._paste(x - rp, y - rp, mask, COLOURS[colour], oid)
        obj.update(bbox=_tight_bbox(mask, x - rp, y - rp, bbox), center=(x, y))
        return obj

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour, obj: dict | None = None):
        """A filled rectangle in pixels (x1, y1 exclusive); recorded as an object if obj."""
        rgb = COLOURS[colour] if isinstance(colour, str) else colour
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(self.size, x1), min(self.size, y1)
        self.rgb[y0:y1, x0:x1] = rgb
        if obj is not None:
            oid = self._add(obj)
            self.ids[y0:y1, x0:x1] = oid
            obj.update(bbox=(x0, y0, x1, y1), center=((x0 + x1) // 2, (y0 + y1) // 2))
        return obj

    def char(self, ch: str, x0: int, y0: int, scale: int, colour: str = "black") -> dict:
        """A character of the bitmap font, top-left at (x0, y0); its id covers its cell."""
        g = _glyph(ch, scale)
        obj = {"kind": "char", "char": ch, "colour": colour}
        oid = self._add(obj)
        h, w = g.shape
        self._paste(x0, y0, g, COLOURS[colour], None)
        x1, y1 = min(self.size, x0 + w), min(self.size, y0 + h)
        self.ids[max(0, y0) : y1, max(0, x0) : x1] = oid
        obj.update(bbox=(max(0, x0), max(0, y0), x1, y1), center=(x0 + w // 2, y0 + h // 2))
        return obj

    def text(self, s: str, x0: int, y0: int, scale: int, colour: str = "black") -> list[dict]:
        adv = (_GLYPH_W + 1) * scale
        return [self.char(ch, x0 + i * adv, y0, scale, colour) for i, ch in enumerate(s)]

    def id_grid(self, grid: int = GRID, min_fraction: float = 1 / 16) -> np.ndarray:
        """Per patch: the object covering most of it (at least min_fraction), else -1."""
        n = len(self.objects)
        cells = _cell_index(self.size, grid)
        counts = np.bincount(
            (cells * (n + 1) + (self.ids.astype(np.int64) + 1)).ravel(),
            minlength=grid * grid * (n + 1),
        ).reshape(grid * grid, n + 1)
        area = counts.sum(axis=1)
        obj_counts = counts[:, 1:]
        if n == 0:
            return np.full((grid, grid), -1, dtype=np.int16)
        best = obj_counts.argmax(axis=1)
        cover = obj_counts[np.arange(grid * grid), best]
        out = np.where(cover * 1.0 >= min_fraction * area, best, -1)
        return out.reshape(grid, grid).astype(np.int16)


def _tight_bbox(mask: np.ndarray, x0: int, y0: int, clip: tuple) -> tuple:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    bx0, by0 = max(clip[0], x0 + int(xs[0])), max(clip[1], y0 + int(ys[0]))
    bx1, by1 = min(clip[2], x0 + int(xs[-1]) + 1), min(clip[3], y0 + int(ys[-1]) + 1)
    return (bx0, by0, max(bx0, bx1), max(by0, by1))


@lru_cache(maxsize=16)
def _cell_index(size: int, grid: int) -> np.ndarray:
    c = (np.arange(size) * grid) // size
    return (c[:, None] * grid + c[None, :]).astype(np.int64)


def _background(rng: _Rng) -> tuple[int, int, int]:
    v = rng.randint(112, 144)
    return (v, v, v)


def _place(
    rng: _Rng,
    radii: Sequence[float],
    taken: list[tuple[float, float, float]],
    margin: float = 0.02,
    gap: float = 0.03,
    tries: int = 300,
) -> list[tuple[float, float]] | None:
    """Normalised centres for discs of the given radii, clear of `taken` and of each other."""
    out = []
    for r in radii:
        for _ in range(tries):
            x = rng.uniform(margin + r, 1 - margin - r)
            y = rng.uniform(margin + r, 1 - margin - r)
            if all((x - tx) ** 2 + (y - ty) ** 2 >= (r + tr + gap) ** 2 for tx, ty, tr in taken):
                break
        else:
            return None
        taken.append((x, y, r))
        out.append((x, y))
    return out


# radius of each shape's bounding disc, in units of its half-size r (triangle: base corners)
_BOUND = {"circle": 1.0, "square": 1.21, "triangle": 1.42, "diamond": 1.0, "cross": 1.06}


def _scene(rng: _Rng, size: int, items: list[tuple[str, str, float]], taken=None) -> _Canvas:
    """Place and draw (shape, colour, half-size) items at random non-overlapping positions."""
    for _ in range(50):
        t = list(taken or [])
        pos = _place(rng, [r * _BOUND[s] for s, _, r in items], t)
        if pos is not None:
            break
    else:  # pragma: no cover - the densities used here always fit
        raise RuntimeError("could not place the scene's objects")
    canvas = _Canvas(size, _background(rng))
    for (shape, colour, r), (x, y) in zip(items, pos, strict=True):
        canvas.shape(shape, colour, x, y, r)
    return canvas


# --------------------------------------------------------------------------------------------
# families: each returns (canvas, question, answer, extra meta). Question and answer are drawn
# before any layout that depends on the image size.


def _gen_existence(rng: _Rng, seed: int, size: int):
    want_yes = seed % 2 == 0  # consecutive seeds alternate: the test split is exactly balanced
    n = rng.randint(3, 7)
    objs = [(rng.choice(SHAPES), rng.choice(COLOUR_NAMES)) for _ in range(n)]
    present = set(objs)
    if want_yes:
        shape, colour = rng.choice(objs)
        kind = "present"
    else:
        colours = sorted({c for _, c in objs}, key=COLOUR_NAMES.index)
        shapes = sorted({s for s, _ in objs}, key=SHAPES.index)
        adversarial = [(s, c) for s in shapes for c in colours if (s, c) not in present]
        if adversarial:  # POPE-adversarial: both attributes are in the scene, not together
            shape, colour = rng.choice(adversarial)
            kind = "adversarial"
        else:
            absent = [(s, c) for s in SHAPES for c in COLOUR_NAMES if (s, c) not in present]
            shape, colour = rng.choice(absent)
            kind = "random"
    items = [(s, c, rng.uniform(0.055, 0.085)) for s, c in objs]
    canvas = _scene(rng, size, items)
    q = f"Is there a {colour} {shape}?"
    return canvas, q, "yes" if want_yes else "no", {"negative": None if want_yes else kind}


_POSITIONS = (
    ("top-left corner", 0, 0),
    ("top middle", 1, 0),
    ("top-right corner", 2, 0),
    ("middle left", 0, 1),
    ("center", 1, 1),
    ("middle right", 2, 1),
    ("bottom-left corner", 0, 2),
    ("bottom middle", 1, 2),
    ("bottom-right corner", 2, 2),
)


def _gen_colour(rng: _Rng, seed: int, size: int):
    if rng.random() < 0.6:  # colour at a named place of a 3×3 layout
        target = rng.randint(0, 8)
        cells = []
        for i in range(9):
            if i == target or rng.random() < 0.7:
                cells.append((i, rng.choice(SHAPES), rng.choice(COLOUR_NAMES)))
        canvas = _Canvas(size, _background(rng))
        answer = None
        for i, shape, colour in cells:
            _, cx, cy = _POSITIONS[i]
            r = rng.uniform(0.05, 0.08)
            x = (cx + 0.5) / 3 + rng.uniform(-0.04, 0.04)
            y = (cy + 0.5) / 3 + rng.uniform(-0.04, 0.04)
            obj = canvas.shape(shape, colour, x, y, r)
            obj["cell"] = _POSITIONS[i][0]
            if i == target:
                answer = colour
        q = f"What colour is the shape in the {_POSITIONS[target][0]}?"
        return canvas, q, answer, {"form": "position", "target_cell": _POSITIONS[target][0]}
    # colour of a named (unique) shape
    n = rng.randint(3, 5)
    shapes = rng.sample(SHAPES, n)
    items = [(s, rng.choice(COLOUR_NAMES), rng.uniform(0.055, 0.085)) for s in shapes]
    shape, colour, _ = items[0]
    canvas = _scene(rng, size, items)
    return canvas, f"What colour is the {shape}?", colour, {"form": "named_shape"}


def _gen_shape(rng: _Rng, seed: int, size: int):
    n = rng.randint(3, 6)
    colours = rng.sample(COLOUR_NAMES, n)
    items = [(rng.choice(SHAPES), c, rng.uniform(0.055, 0.085)) for c in colours]
    shape, colour, _ = items[0]
    canvas = _scene(rng, size, items)
    return canvas, f"What shape is the {colour} object?", shape, {}


def _gen_counting(rng: _Rng, seed: int, size: int):
    count = rng.randint(0, MAX_COUNT)
    n_other = rng.randint(0, 8)
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        others = [s for s in SHAPES if s != shape]
        objs = [(shape, rng.choice(COLOUR_NAMES)) for _ in range(count)]
        objs += [(rng.choice(others), rng.choice(COLOUR_NAMES)) for _ in range(n_other)]
        q, form = f"How many {_PLURAL[shape]} are there?", "shape"
    else:
        colour = rng.choice(COLOUR_NAMES)
        others = [c for c in COLOUR_NAMES if c != colour]
        objs = [(rng.choice(SHAPES), colour) for _ in range(count)]
        objs += [(rng.choice(SHAPES), rng.choice(others)) for _ in range(n_other)]
        q, form = f"How many {colour} shapes are there?", "colour"
    # a jittered 6×6 layout; random sizes, so that area (what pooling keeps) is not count
    cells = list(range(36))
    rng.shuffle(cells)
    canvas = _Canvas(size, _background(rng))
    for (shape, colour), cell in zip(objs, cells, strict=False):
        r = rng.uniform(0.03, 0.05)
        slack = max(0.0, 1 / 12 - r * _BOUND[shape] - 0.006)
        x = (cell % 6 + 0.5) / 6 + rng.uniform(-slack, slack)
        y = (cell // 6 + 0.5) / 6 + rng.uniform(-slack, slack)
        canvas.shape(shape, colour, x, y, r)
    return canvas, q, str(count), {"form": form}


_REL_PHRASE = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _gen_spatial(rng: _Rng, seed: int, size: int):
    a, b = rng.sample(SHAPES, 2)
    rel = rng.choice(("left", "right", "above", "below"))  # where a is relative to b
    if seed % 2 == 0:  # yes/no, alternating: balanced over every 4 consecutive seeds
        yes = (seed // 2) % 2 == 0
        asked = rel if yes else _OPPOSITE[rel]
        q = f"Is the {a} {_REL_PHRASE[asked]} the {b}?"
        answer, form = ("yes" if yes else "no"), "yes_no"
    else:
        q = f"Where is the {a} relative to the {b}: left, right, above or below?"
        answer, form = rel, "open"
    ca, cb = rng.choice(COLOUR_NAMES), rng.choice(COLOUR_NAMES)
    ra, rb = rng.uniform(0.055, 0.08), rng.uniform(0.055, 0.08)
    dx, dy = {"left": (1, 0), "right": (-1, 0), "above": (0, 1), "below": (0, -1)}[rel]
    for _ in range(1000):  # b = a + d·direction + o·orthogonal, clearly along one axis
        ax, ay = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)
        d = rng.uniform(0.28, 0.65)
        o = rng.uniform(-0.3, 0.3) * d
        bx, by = ax + d * dx + o * dy, ay + d * dy + o * dx
        if 0.1 <= bx <= 0.9 and 0.1 <= by <= 0.9:
            break
    rest = [s for s in SHAPES if s not in (a, b)]
    n_other = rng.randint(0, 3)
    items = [
        (rng.choice(rest), rng.choice(COLOUR_NAMES), rng.uniform(0.05, 0.075))
        for _ in range(n_other)
    ]
    taken = [(ax, ay, ra * _BOUND[a]), (bx, by, rb * _BOUND[b])]
    canvas = _scene(rng, size, items, taken=taken)
    oa = canvas.shape(a, ca, ax, ay, ra)
    ob = canvas.shape(b, cb, bx, by, rb)
    meta = {"form": form, "relation": rel, "subject_id": oa["id"], "reference_id": ob["id"]}
    return canvas, q, answer, meta


def _gen_small_object(rng: _Rng, seed: int, size: int):
    colour = rng.choice(COLOUR_NAMES)
    n = rng.randint(2, 5)
    items = [
        (rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.uniform(0.06, 0.1)) for _ in range(n)
    ]
    side = max(3, int(round(0.024 * size)))  # 8 px at 336: about half a patch
    half = side / 2 / size
    for _ in range(50):
        taken: list = []
        pos = _place(rng, [half], taken, margin=0.05)
        rest = _place(rng, [r * _BOUND[s] for s, _, r in items], taken, gap=0.05)
        if pos is not None and rest is not None:
            break
    canvas = _Canvas(size, _background(rng))
    for (shape, c, r), (x, y) in zip(items, rest, strict=True):
        canvas.shape(shape, c, x, y, r)
    x0 = canvas.px(pos[0][0]) - side // 2
    y0 = canvas.px(pos[0][1]) - side // 2
    dot = {"kind": "dot", "shape": "square", "colour": colour}
    canvas.rect(x0, y0, x0 + side, y0 + side, colour, dot)
    return canvas, "What colour is the small dot?", colour, {"dot_id": dot["id"]}


def _text_scale(size: int) -> int:
    return max(1, round(size / 112))  # 3 at 336: 15×21 px characters, about a patch each


def _gen_text(rng: _Rng, seed: int, size: int):
    n = rng.randint(2, 4)
    s = "".join(rng.choice(CHARSET) for _ in range(n))
    k = rng.randint(0, n - 1)
    q = f"What is the {_ORDINALS[k]} character of the text?"
    scale = _text_scale(size)
    pad = 2 * scale
    w = n * (_GLYPH_W + 1) * scale - scale + 2 * pad
    h = _GLYPH_H * scale + 2 * pad
    m = max(1, size // 40)
    x0 = m + int(rng.random() * (size - w - 2 * m + 1))
    y0 = m + int(rng.random() * (size - h - 2 * m + 1))
    cx, cy = (x0 + w / 2) / size, (y0 + h / 2) / size
    panel_r = (w + h) / 2 / size  # >= the half-diagonal
    n_other = rng.randint(0, 3)
    items = [(rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.uniform(0.05, 0.08))
             for _ in range(n_other)]  # fmt: skip
    canvas = _scene(rng, size, items, taken=[(cx, cy, panel_r)])
    canvas.rect(x0, y0, x0 + w, y0 + h, "white", {"kind": "panel", "colour": "white"})
    chars = canvas.text(s, x0 + pad, y0 + pad, scale, "black")
    return canvas, q, s[k], {"text": s, "char_index": k, "char_ids": [c["id"] for c in chars]}


def _gen_chart(rng: _Rng, seed: int, size: int):
    n = rng.randint(3, 6)
    kind = ("tallest", "shortest", "value", "value")[seed % 4]
    while True:
        values = [rng.randint(1, MAX_BAR) for _ in range(n)]
        if kind == "tallest" and values.count(max(values)) == 1:
            break
        if kind == "shortest" and values.count(min(values)) == 1:
            break
        if kind == "value":
            break
    labels = _BAR_LABELS[:n]
    if kind == "tallest":
        q, answer = "Which bar is the tallest?", labels[values.index(max(values))]
    elif kind == "shortest":
        q, answer = "Which bar is the shortest?", labels[values.index(min(values))]
    else:
        k = rng.randint(0, n - 1)
        q, answer = f"What is the value of bar {labels[k]}?", str(values[k])
    bar_colour = rng.choice(tuple(c for c in COLOUR_NAMES if c not in ("white", "yellow")))

    canvas = _Canvas(size, (245, 245, 245))
    ls = max(1, round(size / 168))  # label scale: 10×14 px at 336
    lw, lh = (_GLYPH_W + 1) * ls, _GLYPH_H * ls
    x_l, x_r = int(round(0.15 * size)), int(round(0.96 * size))
    y_t, y_b = int(round(0.06 * size)), size - lh - 2 * max(2, size // 48)
    t = max(1, size // 168)
    span = y_b - y_t

    def y_of(v: int) -> int:
        return y_b - (v * span + MAX_BAR // 2) // MAX_BAR

    for v in range(1, MAX_BAR + 1):  # gridlines, darker every 5
        c = (170, 170, 170) if v % 5 else (120, 120, 120)
        canvas.rect(x_l, y_of(v), x_r, y_of(v) + 1, c)
    for v in (0, 5, 10):  # value labels left of the axis
        s = str(v)
        canvas.text(s, x_l - t - 2 - len(s) * lw, y_of(v) - lh // 2, ls)
    slot = (x_r - x_l) // n
    bw = max(2, (slot * 3) // 5)
    bars = []
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        bx = x_l + i * slot + (slot - bw) // 2
        obj = {"kind": "bar", "label": lab, "value": v, "colour": bar_colour}
        bars.append(canvas.rect(bx, y_of(v), bx + bw, y_b, bar_colour, obj))
        canvas.char(lab, bx + (bw - _GLYPH_W * ls) // 2, y_b + t + max(2, size // 48), ls)
    canvas.rect(x_l - t, y_t, x_l, y_b + t, (0, 0, 0))  # y axis
    canvas.rect(x_l - t, y_b, x_r, y_b + t, (0, 0, 0))  # x axis
    meta = {"form": kind, "values": dict(zip(labels, values, strict=True))}
    return canvas, q, answer, meta


_GENERATORS = {
    "existence": _gen_existence,
    "colour": _gen_colour,
    "shape": _gen_shape,
    "counting": _gen_counting,
    "spatial": _gen_spatial,
    "small_object": _gen_small_object,
    "text": _gen_text,
    "chart": _gen_chart,
}


# --------------------------------------------------------------------------------------------
# public API


def _check_family(family: str) -> int:
    if family not in _GENERATORS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return FAMILIES.index(family)


def generate(family: str, seed: int, image_size: int = 336) -> Sample:
    """The sample of `family` for `seed` (any int >= 0) at `image_size` pixels (>= 48)."""
    fi = _check_family(family)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if image_size < 48:
        raise ValueError("image_size must be at least 48")
    rng = _Rng(seed * 16 + fi)
    canvas, question, answer, extra = _GENERATORS[family](rng, seed, image_size)
    meta = {
        "seed": seed,
        "image_size": image_size,
        "background": canvas.background,
        "objects": canvas.objects,
        "id_grid": canvas.id_grid(),
        **extra,
    }
    return Sample(
        image=Image.fromarray(canvas.rgb),
        question=question,
        answer=answer,
        family=family,
        uid=f"synth/{family}/{seed}",
        meta=meta,
    )


def _families(family: str | Iterable[str] | None) -> tuple[str, ...]:
    if family is None:
        return FAMILIES
    fams = (family,) if isinstance(family, str) else tuple(family)
    for f in fams:
        _check_family(f)
    return fams


def iter_test_split(
    family: str | Iterable[str] | None = None, n_per_family: int = 200, image_size: int = 336
) -> Iterator[Sample]:
    """The fixed test split, lazily: seeds 0..n_per_family-1 of each family, family by family."""
    if not 0 <= n_per_family <= _TEST_SEED_LIMIT:
        raise ValueError(f"n_per_family must be in [0, {_TEST_SEED_LIMIT}]")
    for f in _families(family):
        for seed in range(n_per_family):
            yield generate(f, seed, image_size)


def test_split(
    family: str | Iterable[str] | None = None, n_per_family: int = 200, image_size: int = 336
) -> list[Sample]:
    """The fixed test split (one family, several, or all of them when None).

    Byte-identical across runs and machines; yes/no families are exactly balanced for even
    ``n_per_family`` (spatial's yes/no questions for multiples of 4). At 336 px each image
    holds 330 KiB: prefer ``iter_test_split`` for large splits.
    """
    return list(iter_test_split(family, n_per_family, image_size))


test_split.__test__ = False  # not a pytest test when imported into a test module


def train_stream(
    seed: int = 0, image_size: int = 336, families: Iterable[str] | None = None
) -> Iterator[Sample]:
    """An unbounded training stream, round-robin over `families`, from seeds >= 10**9.

    Different `seed`s give disjoint streams (for the first 2**32 samples per family); no
    training scene shares a seed with the test split.
    """
    fams = _families(families)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    for index in itertools.count():
        yield train_sample(seed, index, image_size, fams)


def train_sample(
    seed: int, index: int, image_size: int = 336, families: Iterable[str] | None = None
) -> Sample:
    """Sample ``index`` of ``train_stream(seed, image_size, families)``, made without the ones
    before it (so that parallel workers can each make their own slice of the stream)."""
    fams = _families(families)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    base = _TRAIN_SEED_BASE + seed * 2**32
    return generate(fams[index % len(fams)], base + index // len(fams), image_size)


def answer_vocabulary(family: str | None = None) -> list[str]:
    """The canonical answers of a family, or of all families (union, first-seen order)."""
    if family is not None:
        _check_family(family)
        return list(_VOCAB[family])
    out: dict[str, None] = {}
    for f in FAMILIES:
        out.update(dict.fromkeys(_VOCAB[f]))
    return list(out)


def sample_hash(sample: Sample) -> str:
    """sha256 of the raw image array (with its shape), the question and the answer."""
    h = hashlib.sha256()
    _update_hash(h, sample)
    return h.hexdigest()


def _update_hash(h, sample: Sample) -> None:
    arr = np.asarray(sample.image.convert("RGB"), dtype=np.uint8)
    h.update(repr(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    for s in (sample.question, sample.answer):
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


def split_hash(samples: Iterable[Sample]) -> str:
    """sha256 over every sample's image bytes, question and answer, in order."""
    h = hashlib.sha256()
    for s in samples:
        _update_hash(h, s)
    return h.hexdigest()


def asked_cells(sample: Sample) -> np.ndarray:
    """The patches (row-major indices into the GRID×GRID grid) of the object a text or
    small-object question asks about: the asked character or the dot."""
    meta = sample.meta
    if sample.family == "text":
        asked = meta["char_ids"][meta["char_index"]]
    elif sample.family == "small_object":
        asked = meta["dot_id"]
    else:
        raise ValueError(f"sample must be a text or small_object question, got {sample.family!r}")
    return np.flatnonzero(meta["id_grid"].ravel() == asked)


def dense_labels(sample: Sample) -> dict[str, np.ndarray]:
    """Per-patch labels (GRID×GRID int arrays, -1 where none) from ``meta``, for supervision.

    ``colour``: index into COLOUR_NAMES; ``shape``: index into SHAPES (shapes only);
    ``char``: index into CHARSET (text-family characters; chart labels use other digits and
    letters and get -1 unless in CHARSET); ``object``: the object id (``meta["id_grid"]``).
    """
    ids = sample.meta["id_grid"]
    objs = sample.meta["objects"]
    colour = np.full(len(objs) + 1, -1, dtype=np.int16)
    shape = colour.copy()
    char = colour.copy()
    for o in objs:
        i = o["id"]
        if o.get("colour") in COLOURS:
            colour[i] = COLOUR_NAMES.index(o["colour"])
        if o["kind"] == "shape":
            shape[i] = SHAPES.index(o["shape"])
        if o["kind"] == "char" and o["char"] in CHARSET:
            char[i] = CHARSET.index(o["char"])
    return {
        "object": ids.copy(),
        "colour": colour[ids],
        "shape": shape[ids],
        "char": char[ids],
    }


# --------------------------------------------------------------------------------------------
# answer normalisation

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS["none"] = "0"
_NUMBER_WORDS["no"] = "0"
_COLOUR_ALIASES = {"violet": "purple", "magenta": "purple", "navy": "blue", "gold": "yellow"}
_SHAPE_ALIASES = {
    "circles": "circle", "disc": "circle", "disk": "circle", "dot": "circle", "round": "circle",
    "squares": "square", "triangles": "triangle", "diamonds": "diamond", "rhombus": "diamond",
    "crosses": "cross", "plus": "cross", "x": "cross",
}  # fmt: skip
_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "false", "incorrect"}
_DIRECTIONS = {
    "left": "left", "right": "right", "above": "above", "over": "above", "top": "above",
    "up": "above", "upper": "above", "below": "below", "under": "below", "beneath": "below",
    "underneath": "below", "bottom": "below", "down": "below", "lower": "below",
}  # fmt: skip


def _words(text: str) -> list[str]:
    t = str(text).strip().lower().replace("colour", "color")
    return re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", t)


def _number(w: str) -> str | None:
    if w in _NUMBER_WORDS:
        return _NUMBER_WORDS[w]
    if re.fullmatch(r"[0-9]+(\.0+)?", w):
        return str(int(float(w)))
    return None


def normalize_answer(family: str, text: str) -> str:
    """A free-form answer mapped to the canonical form of `family`'s vocabulary.

    Lower-cases, strips punctuation and filler ("Yes." → "yes", "The shape is Red" → "red",
    "seven" → "7", "bar c" → "C", "'k'" → "K"). Text that names nothing in the vocabulary
    comes back cleaned (lower-cased, single-spaced), so it simply never matches.
    """
    _check_family(family)
    words = _words(text)
    cleaned = " ".join(words)
    if not words:
        return ""
    if family == "existence" or (family == "spatial" and words[0] in _YES | _NO):
        if words[0] in _YES:
            return "yes"
        if words[0] in _NO:
            return "no"
        return cleaned
    if family == "spatial":
        for w in words:
            if w in _DIRECTIONS:
                return _DIRECTIONS[w]
        return cleaned
    if family in ("colour", "small_object"):
        for w in words:
            w = _COLOUR_ALIASES.get(w, w)
            if w in COLOURS:
                return w
        return cleaned
    if family == "shape":
        for w in words:
            w = _SHAPE_ALIASES.get(w, w)
            if w in SHAPES:
                return w
        return cleaned
    if family == "counting":
        for w in words:
            n = _number(w)
            if n is not None:
                return n
        return cleaned
    if family == "text":
        raw = str(text).strip()
        quoted = re.findall(r"[\"'`“”‘’]([A-Za-z0-9])[\"'`“”‘’]", raw)
        if quoted:
            return quoted[-1].upper()
        singles = [w for w in words if len(w) == 1]
        if singles:
            return singles[-1].upper()
        for w in words:
            n = _number(w)
            if n is not None and len(n) == 1:
                return n
        return cleaned.upper() if len(cleaned) <= 4 else cleaned
    # chart: a number if there is one, else the last single letter (skips the article "a")
    for w in words:
        n = _number(w) if w not in ("no", "none") else None
        if n is not None:
            return n
    letters = [w for w in words if len(w) == 1 and w.isalpha()]
    if letters:
        return letters[-1].upper()
    return cleaned


# --------------------------------------------------------------------------------------------
# documentation image


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return [*lines, cur] if cur else lines


def render_examples_grid(
    path: str, image_size: int = 336, per_family: int = 2, columns: int = 4
) -> Image.Image:
    """Write a PNG with `per_family` test-split examples per family, Q and A under each."""
    samples = [generate(f, seed, image_size) for f in FAMILIES for seed in range(per_family)]
    font_size = 15
    font = ImageFont.load_default(size=font_size)
    pad, line_h = 8, font_size + 3
    text_w = max(image_size, 260)
    tile_w, tile_h = text_w + 2 * pad, image_size + 5 * line_h + 2 * pad
    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x, y = (i % columns) * tile_w + pad, (i // columns) * tile_h + pad
        sheet.paste(s.image, (x + (text_w - image_size) // 2, y))
        ty = y + image_size + 4
        draw.text((x, ty), f"[{s.family}]  {s.uid}", fill=(110, 110, 110), font=font)
        ty += line_h
        for line in _wrap(draw, f"Q: {s.question}", font, text_w)[:3]:
            draw.text((x, ty), line, fill=(0, 0, 0), font=font)
            ty += line_h
        draw.text((x, ty), f"A: {s.answer}", fill=(0, 110, 0), font=font)
    sheet.save(path)
    return sheet
