"""Where does tokengine-tiny's text reading fail: in the ViT's grid, or where the reducer looks?

    python bench/text_reading.py [--model tokengine-tiny] [--tokens 1,576] [--train 1600]
                                 [--held-out 400] [--batch-size 100] [--json PATH]

Text questions ask for the k-th character of a 2-4 character word. On ``--train + --held-out``
questions of the validation split (``tokengine.training.scoring.validation_split``: disjoint
from the training stream and the test split):

1. **The ViT's grid.** A multinomial logistic regression (``token_probe.probe_accuracy``) reads
   the asked character from the frozen ViT's tokens, fitted on the first ``--train`` questions
   and scored on the rest: from the patches the character covers (their mean and maximum), from
   the 3x3 patches at its top-left patch, and, as a control without its position, from the
   whole grid's mean and maximum. The patches come from the generator's ground truth
   (``meta["id_grid"]``).
2. **Where the fusion reducer looks.** For the held-out questions at each N_l, the share of
   each block's cross-attention mass (``return_attn_mass``: averaged over heads and queries)
   that falls on the asked character's patches, on the word's other characters and on the
   rest, beside the share the asked character's patches would get from uniform attention; and
   the asked character's share of the mass on the word, beside its share of the word's
   patches. The small-object family (one dot of a few pixels, which the model answers well) is
   the control.

The model's own accuracy on the held-out questions is printed beside both.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from token_probe import checked_engine, probe_accuracy  # a script beside this one

from tokengine.data.synthetic import GRID, Sample, asked_cells, normalize_answer
from tokengine.engine import Engine
from tokengine.models import tiny
from tokengine.models.reducer import recorded_attn_mass
from tokengine.training.cache import encode_samples
from tokengine.training.scoring import validation_split


def vit_probes(engine: Engine, samples: list[Sample], n_train: int, batch_size: int) -> dict:
    """Held-out accuracy of linear probes that read the asked character off the ViT grid."""
    # (R, GRID * GRID, Dv) in float32, as the ViT computes them (the cache rounds to float16)
    grid = torch.from_numpy(encode_samples(engine.vlm, samples, batch_size, torch.float32))
    covered, window = [], []
    for s, g in zip(samples, grid, strict=True):
        cells = asked_cells(s)  # never empty for the validation split's questions
        under = g[torch.from_numpy(cells)]
        covered.append(torch.cat([under.mean(0), under.amax(0)]))
        r, c = (min(int(v), GRID - 3) for v in divmod(int(cells.min()), GRID))
        window.append(g.view(GRID, GRID, -1)[r : r + 3, c : c + 3].reshape(-1))
    labels = [s.answer for s in samples]
    return {
        "covered patches (mean, max)": probe_accuracy(torch.stack(covered), labels, n_train),
        "3x3 patches at its top-left": probe_accuracy(torch.stack(window), labels, n_train),
        "whole grid (mean, max)": probe_accuracy(
            torch.cat([grid.mean(1), grid.amax(1)], 1), labels, n_train
        ),
    }


def attention_shares(
    engine: Engine, samples: list[Sample], tokens: int, batch_size: int
) -> dict[str, float]:
    """The model's accuracy on ``samples`` at N_l=``tokens`` and, per fusion block, the mean
    share of its cross-attention mass on the asked object, on other characters, and uniform."""
    with ExitStack() as stack:
        recorded = [stack.enter_context(recorded_attn_mass(block.cross_attn))
                    for block in engine.vlm.reducer.blocks]  # fmt: skip
        res = engine.generate([s.image for s in samples], [s.question for s in samples],
                              tokens=tokens, reducer="fusion", max_new_tokens=4,
                              batch_size=batch_size)  # fmt: skip
    pairs = zip(res.texts, samples, strict=True)
    right = [normalize_answer(s.family, t) == s.answer for t, s in pairs]
    out = {"accuracy": float(np.mean(right))}
    ids = np.stack([s.meta["id_grid"].ravel() for s in samples])  # (R, GRID * GRID)
    asked = np.zeros(ids.shape, dtype=bool)
    for row, s in zip(asked, samples, strict=True):
        row[asked_cells(s)] = True
    chars = np.stack([np.isin(ids[i], s.meta.get("char_ids", [])) for i, s in enumerate(samples)])
    others = chars & ~asked
    out.update(mass_shares(np.ones(ids.shape) / ids.shape[1], asked, others, "uniform"))
    for b, masses in enumerate(recorded):
        mass = torch.cat(masses).float().cpu().numpy()
        if mass.shape != asked.shape:  # each batch's reducer call recorded once
            raise RuntimeError(f"block {b + 1}: mass {mass.shape} for patches {asked.shape}")
        out.update(mass_shares(mass, asked, others, f"block {b + 1}"))
    return out


def mass_shares(mass: np.ndarray, asked: np.ndarray, others: np.ndarray, name: str) -> dict:
    """Mean shares of ``mass`` (R, N) on the ``asked`` patches and the ``others`` (boolean
    (R, N)), and the asked ones' share of the two together; without others, the first only."""
    on_asked, on_others = (mass * asked).sum(1), (mass * others).sum(1)
    out = {f"{name}: on asked": float(on_asked.mean())}
    if others.any():
        out[f"{name}: on other chars"] = float(on_others.mean())
        out[f"{name}: asked / word"] = float((on_asked / (on_asked + on_others)).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=tiny.DEFAULT_MODEL, help="a shipped name or a directory")
    p.add_argument("--tokens", default="1,576", help="comma-separated N_l; default 1,576")
    p.add_argument("--train", type=int, default=1600, help="questions to fit probes on")
    p.add_argument("--held-out", type=int, default=400, help="questions to score; default 400")
    p.add_argument("--batch-size", type=int, default=100, help="questions per batch")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()
    engine, tokens = checked_engine(p, args, "fusion")
    t0 = time.perf_counter()
    text = validation_split("text", args.train + args.held_out)
    dots = validation_split("small_object", args.held_out)
    held = text[args.train :]
    labels = [s.answer for s in text]
    top = max(sorted(set(labels[: args.train])), key=labels[: args.train].count)
    result = {
        "model": args.model,
        "train": args.train,
        "held_out": args.held_out,
        "majority": float(np.mean([a == top for a in labels[args.train :]])),
        "vit_probes": vit_probes(engine, text, args.train, args.batch_size),
        "attention": {
            f"{fam}@{n}": attention_shares(engine, samples, n, args.batch_size)
            for n in tokens
            for fam, samples in (("text", held), ("small_object", dots))
        },
    }
    print(f"{args.model}; text questions of the validation split: probes fitted on "
          f"{args.train}, everything scored on {args.held_out}")  # fmt: skip
    print(f"\nmost common answer: {result['majority']:.3f}")
    for name, acc in result["vit_probes"].items():
        print(f"ViT grid probe, {name}: {acc:.3f}")
    keys = sorted({k for row in result["attention"].values() for k in row}, key=_column_order)
    print("\n| family@N_l | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for name, row in result["attention"].items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in keys)
              + " |")  # fmt: skip
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def _column_order(key: str) -> tuple:
    return (key != "accuracy", not key.startswith("uniform"), key)


if __name__ == "__main__":
    main()
