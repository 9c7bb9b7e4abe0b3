"""bench/text_reading.py: shares by hand, attention and probes through the Engine, a CLI error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import bench_script

from tokengine.training.scoring import validation_split

SCRIPT = Path(__file__).parents[1] / "bench" / "text_reading.py"


def test_mass_shares_by_hand():
    tr = bench_script("text_reading")
    mass = np.array([[0.5, 0.25, 0.25, 0.0], [0.0, 0.1, 0.3, 0.6]])
    asked = np.array([[True, False, False, False], [False, False, True, False]])
    others = np.array([[False, True, False, False], [False, True, False, True]])
    got = tr.mass_shares(mass, asked, others, "b")
    assert got["b: on asked"] == pytest.approx((0.5 + 0.3) / 2)
    assert got["b: on other chars"] == pytest.approx((0.25 + 0.7) / 2)
    assert got["b: asked / word"] == pytest.approx((0.5 / 0.75 + 0.3 / 1.0) / 2)
    assert set(tr.mass_shares(mass, asked, others & False, "b")) == {"b: on asked"}


def test_attention_shares_and_probes_through_the_engine():
    from tokengine.engine import Engine
    from tokengine.models.reducer import recorded_attn_mass
    from tokengine.models.tiny import random_tiny

    tr = bench_script("text_reading")
    engine = Engine(random_tiny(seed=0))
    samples = validation_split("text", 14)
    shares = tr.attention_shares(engine, samples[:7], tokens=4, batch_size=3)
    blocks = len(engine.vlm.reducer.blocks)
    assert len(shares) == 1 + 3 * (blocks + 1)
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    for b in range(1, blocks + 1):
        assert shares[f"block {b}: on asked"] + shares[f"block {b}: on other chars"] <= 1 + 1e-6
    # the recorder sees every batch's reducer call once per block: 3 + 3 + 1 rows
    with recorded_attn_mass(engine.vlm.reducer.blocks[0].cross_attn) as masses:
        engine.generate([s.image for s in samples[:7]], [s.question for s in samples[:7]],
                        tokens=4, reducer="fusion", max_new_tokens=4, batch_size=3)  # fmt: skip
    assert sum(m.shape[0] for m in masses) == 7
    probes = tr.vit_probes(engine, samples, n_train=10, batch_size=4)
    assert len(probes) == 3 and all(0.0 <= v <= 1.0 for v in probes.values())


def test_cli_names_bad_tokens():
    res = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "1,x"],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "--tokens must be comma-separated integers" in res.stderr
