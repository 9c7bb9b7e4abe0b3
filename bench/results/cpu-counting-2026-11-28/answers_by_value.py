"""Per answer value, how tokengine-tiny answers one family's validation questions at N_l=1 and
576: the accuracy at each and how often the two answers are the same.

    python bench/results/cpu-counting-2026-11-28/answers_by_value.py FAMILY [QUESTIONS]
"""

import sys
from collections import defaultdict

import numpy as np

from tokengine.data.synthetic import normalize_answer
from tokengine.engine import Engine
from tokengine.models.tiny import shipped_path
from tokengine.training.scoring import validation_split


def main() -> None:
    family = sys.argv[1]
    samples = validation_split(family, int(sys.argv[2]) if len(sys.argv) > 2 else 400)
    engine = Engine.from_pretrained(shipped_path())
    given = {}
    for tokens in (1, 576):
        images, questions = [s.image for s in samples], [s.question for s in samples]
        res = engine.generate(images, questions, tokens=tokens, reducer="fusion", max_new_tokens=4)
        given[tokens] = [normalize_answer(family, t) for t in res.texts]
    rows = defaultdict(list)  # answer -> [(right at 1, right at 576, same answer)]
    for s, a1, a576 in zip(samples, given[1], given[576], strict=True):
        rows[s.answer].append((a1 == s.answer, a576 == s.answer, a1 == a576))
    rows["all"] = [r for k in list(rows) for r in rows[k]]
    print(f"{family}: answer, questions, accuracy at N_l=1, at 576, same answer at both")
    for answer in sorted(rows, key=lambda a: (a == "all", len(a), a)):
        right1, right576, same = np.mean(rows[answer], axis=0)
        print(f"{answer:>6} {len(rows[answer]):4d} {right1:.3f} {right576:.3f} {same:.3f}")


if __name__ == "__main__":
    main()
