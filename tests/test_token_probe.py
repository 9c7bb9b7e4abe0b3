"""bench/token_probe.py: recording the reduced tokens and the linear probe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import bench_script

SCRIPT = Path(__file__).parents[1] / "bench" / "token_probe.py"


def test_pooled_is_the_mean_and_the_max_over_tokens():
    tp = bench_script("token_probe")
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # (1, 2 tokens, 2)
    assert tp.pooled(x).tolist() == [[2.0, -1.0, 3.0, 0.0]]


def test_probe_reads_separable_labels_and_not_random_ones():
    tp = bench_script("token_probe")
    g = torch.Generator().manual_seed(0)
    labels = [str(i % 4) for i in range(400)]
    x = torch.randn(400, 8, generator=g)
    x[:, 0] += 10 * torch.tensor([float(a) for a in labels])  # the label, plainly in feature 0
    assert tp.probe_accuracy(x, labels, n_train=300) == 1.0
    shuffled = [labels[i] for i in torch.randperm(400, generator=g).tolist()]
    assert tp.probe_accuracy(x, shuffled, n_train=300) < 0.45  # chance: 0.25
    unseen = labels[:300] + ["9"] * 100  # held-out labels the probe never saw: all misses
    assert tp.probe_accuracy(x, unseen, n_train=300) == 0.0


def test_family_probe_records_every_batch_through_the_engine():
    from tokengine.engine import Engine
    from tokengine.models.tiny import random_tiny

    tp = bench_script("token_probe")
    engine = Engine(random_tiny(seed=0))
    engine.vlm.reducer = tp.RecordedTokens(engine.vlm.reducer)
    r = tp.family_probe(engine, "counting", "fusion", [1, 4], n_train=12, n_held=6, batch_size=5)
    assert set(r) == {"majority", "model@1", "probe@1", "model@4", "probe@4"}
    assert all(0.0 <= v <= 1.0 for v in r.values())
    assert engine.vlm.reducer.outputs == []  # cleared after use


def test_cli_names_a_bad_family():
    res = subprocess.run([sys.executable, str(SCRIPT), "--families", "counting,maths"],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "--families: unknown ['maths']" in res.stderr
