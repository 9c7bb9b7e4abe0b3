"""How much of the answer can a linear probe read off the reduced tokens, at each N_l?

    python bench/token_probe.py [--model tokengine-tiny] [--reducer fusion] [--tokens 1,576]
                                [--families counting,text,chart] [--train 1600] [--held-out 400]
                                [--json PATH]

For each family, questions of the validation split (``tokengine.training.scoring.validation_split``:
disjoint from the training stream and from the test split) are answered by the Engine at each
N_l while the reduced tokens (B, N_l, D) are recorded. A multinomial logistic regression on
their mean and their maximum over the N_l tokens (2D features, standardised) is fitted on the
first ``--train`` questions and scored on the next ``--held-out``, beside the model's own
accuracy on those. If the probe reads the answer off many tokens far better than off one while
the model does not, the extra tokens hold information the LM leaves unused; if it does not, what
the reducer puts into its tokens is the limit. Prints a markdown table; ``--json`` also writes
the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from token_usage import trained_engine  # a script beside this one
from torch import nn

from tokengine.data.synthetic import FAMILIES, normalize_answer
from tokengine.engine import Engine
from tokengine.models import tiny
from tokengine.training.scoring import validation_split


class RecordedTokens(nn.Module):
    """Wraps a reducer module and keeps each output (B, N_l, D), as float32 on the CPU."""

    def __init__(self, reducer: nn.Module) -> None:
        super().__init__()
        self.reducer = reducer
        self.outputs: list[torch.Tensor] = []

    def check_tokens(self, tokens: int) -> None:
        self.reducer.check_tokens(tokens)  # the Engine asks before it generates

    def forward(self, image, tokens, question=None, cu_seqlens=None) -> torch.Tensor:
        out = self.reducer(image, tokens, question, cu_seqlens)
        self.outputs.append(out.detach().float().cpu())
        return out


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N_l, D) -> (B, 2D): the mean and the maximum over the tokens."""
    return torch.cat([tokens.mean(1), tokens.amax(1)], dim=1)


def probe_accuracy(x: torch.Tensor, labels: list[str], n_train: int, l2: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted on the first ``n_train``
    rows of ``x`` (R, F) with ``labels`` (R,); held-out labels unseen in training count as
    misses."""
    classes = sorted(set(labels[:n_train]))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index.get(c, -1) for c in labels])
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    z = (x - mean) / std
    probe = nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(probe(z[:n_train]), y[:n_train]) + l2 * probe.weight.square().sum()
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():
        guess = probe(z[n_train:]).argmax(1)
    return float((guess == y[n_train:]).float().mean())


def family_probe(engine: Engine, family: str, reducer: str, tokens: list[int], n_train: int,
                 n_held: int, batch_size: int) -> dict:  # fmt: skip
    """Per N_l: the model's and the probe's accuracy on the held-out questions of ``family``,
    and the share of its most common training answer among them."""
    samples = validation_split(family, n_train + n_held)
    labels = [s.answer for s in samples]
    top = max(sorted(set(labels[:n_train])), key=labels[:n_train].count)
    out = {"majority": float(np.mean([a == top for a in labels[n_train:]]))}
    recorder = engine.vlm.reducer
    for n in tokens:
        recorder.outputs = []
        res = engine.generate([s.image for s in samples], [s.question for s in samples],
                              tokens=n, reducer=reducer, max_new_tokens=4,
                              batch_size=batch_size)  # fmt: skip
        model_ok = [normalize_answer(family, t) == a for t, a in zip(res.texts, labels,
                                                                      strict=True)]  # fmt: skip
        x = pooled(torch.cat(recorder.outputs))
        out[f"model@{n}"] = float(np.mean(model_ok[n_train:]))
        out[f"probe@{n}"] = probe_accuracy(x, labels, n_train)
    recorder.outputs = []
    return out


def checked_engine(
    p: argparse.ArgumentParser, args: argparse.Namespace, reducer: str
) -> tuple[Engine, list[int]]:
    """The trained Engine of ``args.model`` and the N_l of ``args.tokens``, after the checks
    this script shares with text_reading.py (``--tokens``, ``--train``, ``--held-out``,
    ``--batch-size``); a bad value is a usage error."""
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    for flag, value in (("--train", args.train), ("--held-out", args.held_out),
                        ("--batch-size", args.batch_size)):  # fmt: skip
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    engine = trained_engine(p, args.model)
    for n in tokens:
        try:
            engine.check_tokens(n, reducer)
        except ValueError as exc:
            p.error(f"--tokens: {exc}")
    return engine, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=tiny.DEFAULT_MODEL, help="a shipped name or a directory")
    p.add_argument("--reducer", default="fusion", choices=("fusion", "fusion-noq"))
    p.add_argument("--tokens", default="1,576", help="comma-separated N_l")
    p.add_argument("--families", default="counting,text,chart", help="comma-separated")
    p.add_argument("--train", type=int, default=1600, help="questions per family to fit on")
    p.add_argument("--held-out", type=int, default=400, help="questions per family to score")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()
    families = args.families.split(",")
    if unknown := [f for f in families if f not in FAMILIES]:
        p.error(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    engine, tokens = checked_engine(p, args, args.reducer)
    engine.vlm.reducer = RecordedTokens(engine.vlm.reducer)
    t0 = time.perf_counter()
    head = ["family", "majority", *(f"{w}@{n}" for n in tokens for w in ("model", "probe"))]
    print(f"{args.model}, {args.reducer}; validation split: fit on {args.train}, score "
          f"{args.held_out} questions per family")  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    rows = {}
    for fam in families:
        rows[fam] = family_probe(engine, fam, args.reducer, tokens, args.train, args.held_out,
                                 args.batch_size)  # fmt: skip
        print(f"| {fam} | " + " | ".join(f"{rows[fam][k]:.3f}" for k in head[1:]) + " |",
              flush=True)  # fmt: skip
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        setup = {"model": args.model, "reducer": args.reducer, "tokens": tokens,
                 "train": args.train, "held_out": args.held_out}  # fmt: skip
        args.json.write_text(json.dumps({**setup, "families": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
