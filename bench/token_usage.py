"""Which of the N_l reduced tokens does a tokengine model's LM read? A swap test.

    python bench/token_usage.py [--model tokengine-tiny] [--reducer fusion] [--tokens 576]
                                [--per-family 200] [--batch-size 50] [--json PATH]

For each family of the fixed test split the model answers three times at N_l tokens:

- ``as made``: the reduced tokens as the reducer makes them (the usual accuracy);
- ``first swapped``: the first reduced token taken from another question of the same family
  and form, answered in the same batch (its donor: the previous such sample, cyclically), the
  other N_l - 1 its own;
- ``rest swapped``: its own first token, the other N_l - 1 from the donor.

Where the donor's own answer (``as made``) differs from the sample's, an answer that follows
the donor shows which tokens the LM reads: if it reads only the first token, ``first swapped``
answers follow the donor and ``rest swapped`` keeps the accuracy. Needs a reducer that makes
N_l >= 2 tokens. Prints a markdown table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokengine.data.synthetic import FAMILIES, normalize_answer, test_split
from tokengine.engine import Engine
from tokengine.eval import load_model
from tokengine.models import tiny
from tokengine.models.tiny import IMAGE_SIZE

MODES = ("as made", "first swapped", "rest swapped")


class SwappedTokens(nn.Module):
    """Wraps a reducer module: its output (B, N_l, D) with the first token (``part="first"``)
    or the other N_l - 1 (``part="rest"``) taken from row ``donor[b]`` of the batch;
    ``part=None`` leaves it as made."""

    def __init__(self, reducer: nn.Module) -> None:
        super().__init__()
        self.reducer = reducer
        self.part: str | None = None
        self.donor: torch.Tensor | None = None  # (B,) row indices

    def check_tokens(self, tokens: int) -> None:
        self.reducer.check_tokens(tokens)  # the Engine asks before it generates

    def forward(self, image, tokens, question=None, cu_seqlens=None) -> torch.Tensor:
        out = self.reducer(image, tokens, question, cu_seqlens)
        if self.part is None:
            return out
        cols = slice(0, 1) if self.part == "first" else slice(1, None)
        out = out.clone()
        out[:, cols] = out[self.donor.to(out.device), cols]
        return out


def trained_engine(parser: argparse.ArgumentParser, model: str) -> Engine:
    """The Engine of ``model`` (a shipped name or a directory, found as eval and the sweep find
    it) when it has trained reducer weights; otherwise a usage error."""
    try:
        vlm, _, random_init = load_model(model, torch.float32, "cpu", seed=0)
    except FileNotFoundError as exc:
        parser.error(f"--model: {exc}")
    if random_init or vlm.reducer is None:
        parser.error(f"--model {model}: no trained reducer weights to look at")
    return Engine(vlm)


def donors(forms: list, batch_size: int) -> list[int]:
    """The donor of each sample when answered in batches of ``batch_size``: the previous sample
    of its batch with the same form (``forms[i]``), cyclically; itself if it is its batch's
    only one of that form."""
    out = list(range(len(forms)))
    for start in range(0, len(forms), batch_size):
        groups: dict = {}
        for i in range(start, min(start + batch_size, len(forms))):
            groups.setdefault(forms[i], []).append(i)
        for members in groups.values():
            for k, i in enumerate(members):
                out[i] = members[k - 1]
    return out


def swap_test(engine: Engine, family: str, reducer: str, tokens: int, per_family: int,
              batch_size: int) -> dict:  # fmt: skip
    """One family's accuracies per mode and, per swap mode, how often the answer follows the
    donor's as-made answer where that differs from the sample's."""
    samples = test_split(family, per_family, IMAGE_SIZE)
    donor = donors([s.meta.get("form") for s in samples], batch_size)
    wrapper = engine.vlm.reducer
    answers = {}
    for mode in MODES:
        wrapper.part = {"as made": None, "first swapped": "first", "rest swapped": "rest"}[mode]
        texts = []
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            wrapper.donor = torch.tensor(donor[start : start + len(batch)]) - start
            res = engine.generate([s.image for s in batch], [s.question for s in batch],
                                  tokens=tokens, reducer=reducer, max_new_tokens=4,
                                  batch_size=len(batch))  # fmt: skip
            texts += res.texts
        answers[mode] = [normalize_answer(family, t) for t in texts]
    wrapper.part = wrapper.donor = None
    made = answers["as made"]
    differ = [i for i in range(len(samples)) if made[donor[i]] != made[i]]
    out = {"n": len(samples), "pairs_differ": len(differ)}
    for mode in MODES:
        out[mode] = float(np.mean([a == s.answer for a, s in zip(answers[mode], samples,
                                                                  strict=True)]))  # fmt: skip
    for mode in MODES[1:]:
        follow = [answers[mode][i] == made[donor[i]] for i in differ]
        out[f"{mode}: follows donor"] = float(np.mean(follow)) if differ else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=tiny.DEFAULT_MODEL, help="a shipped name or a directory")
    p.add_argument("--reducer", default="fusion", choices=("fusion", "fusion-noq"))
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--per-family", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()
    if args.tokens < 2:
        p.error(f"--tokens must be >= 2 (a first token and the rest), got {args.tokens}")
    if args.batch_size < 2:
        p.error(f"--batch-size must be >= 2 (a donor in every batch), got {args.batch_size}")
    engine = trained_engine(p, args.model)
    engine.vlm.reducer = SwappedTokens(engine.vlm.reducer)
    t0 = time.perf_counter()
    rows = {}
    head = ["family", *MODES, "first swapped: follows donor", "rest swapped: follows donor",
            "pairs"]  # fmt: skip
    print(f"{args.model}, {args.reducer} at N_l={args.tokens}, {args.per_family} test questions "
          f"per family, batches of {args.batch_size}")  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for fam in FAMILIES:
        r = swap_test(engine, fam, args.reducer, args.tokens, args.per_family, args.batch_size)
        rows[fam] = r
        cells = [f"{r[k]:.3f}" for k in head[1:-1]] + [str(r["pairs_differ"])]
        print(f"| {fam} | " + " | ".join(cells) + " |", flush=True)
    mean = {k: float(np.mean([rows[f][k] for f in FAMILIES])) for k in MODES}
    print("| mean | " + " | ".join(f"{mean[k]:.3f}" for k in MODES) + " | | | |")
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        setup = {k: getattr(args, k) for k in ("model", "reducer", "tokens", "per_family",
                                                "batch_size")}  # fmt: skip
        args.json.write_text(json.dumps({**setup, "families": rows, "mean": mean}, indent=1)
                             + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
