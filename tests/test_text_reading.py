"""bench/text_reading.py: the attention-mass recorder, the shares, and the whole run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bench_script

from tokengine.ops import QCCrossAttention
from tokengine.training.scoring import validation_split

SCRIPT = Path(__file__).parents[1] / "bench" / "text_reading.py"


def test_recorded_mass_changes_nothing_and_keeps_each_calls_mass():
    tr = bench_script("text_reading")
    torch.manual_seed(0)
    attn = QCCrossAttention(8, 2).double()
    queries, image = torch.randn(3, 2, 8).double(), torch.randn(3, 5, 8).double()
    text, cu = torch.randn(4, 8).double(), torch.tensor([0, 1, 1, 4], dtype=torch.int32)
    want_out, want_mass = attn(queries, image, text, cu, return_attn_mass=True)
    recorder = tr.RecordedMass(attn)
    out = recorder(queries, image, text, cu)
    recorder(queries[:1], image[:1])
    assert torch.equal(out, want_out)
    assert [m.shape for m in recorder.masses] == [(3, 5), (1, 5)]
    assert torch.allclose(recorder.masses[0].double(), want_mass, atol=1e-6)
    # without a question every query's whole mass goes to the image
    assert torch.allclose(recorder.masses[1].sum(1), torch.ones(1))


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


@pytest.mark.parametrize("family", ["text", "small_object"])
def test_the_asked_object_covers_patches(family):
    """The ViT probes and the shares read the asked object's patches off ``id_grid``."""
    tr = bench_script("text_reading")
    for s in validation_split(family, 60):
        oid = tr.asked_object(s)
        assert (s.meta["id_grid"] == oid).any(), s.uid
        if family == "text":
            chars = {o["id"]: o["char"] for o in s.meta["objects"] if o["kind"] == "char"}
            assert chars[oid] == s.answer


def test_attention_shares_and_probes_through_the_engine():
    from tokengine.engine import Engine
    from tokengine.models.tiny import random_tiny

    tr = bench_script("text_reading")
    engine = Engine(random_tiny(seed=0))
    for block in engine.vlm.reducer.blocks:
        block.cross_attn = tr.RecordedMass(block.cross_attn)
    samples = validation_split("text", 14)
    shares = tr.attention_shares(engine, samples[:7], tokens=4, batch_size=3)
    blocks = len(engine.vlm.reducer.blocks)
    assert len(shares) == 1 + 3 * (blocks + 1)
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    for b in range(1, blocks + 1):
        assert shares[f"block {b}: on asked"] + shares[f"block {b}: on other chars"] <= 1 + 1e-6
    rows = sum(m.shape[0] for m in engine.vlm.reducer.blocks[0].cross_attn.masses)
    assert rows == 7  # every batch recorded, once per block
    probes = tr.vit_probes(engine, samples, n_train=10, batch_size=4)
    assert len(probes) == 3 and all(0.0 <= v <= 1.0 for v in probes.values())


def test_cli_names_bad_tokens():
    res = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "1,x"],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "--tokens must be comma-separated integers" in res.stderr
