"""bench/token_usage.py: the swap test's donors and token swapping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import bench_script
from torch import nn

SCRIPT = Path(__file__).parents[1] / "bench" / "token_usage.py"


def test_donors_stay_in_their_batch_and_form():
    tu = bench_script("token_usage")
    forms = ["a", "b", "a", "a", "b", "a", "c"]  # batches [0..3], [4..6]
    assert tu.donors(forms, 4) == [3, 1, 0, 2, 4, 5, 6]  # 1, 5 and 6 have no other: themselves
    assert tu.donors([None] * 5, 5) == [4, 0, 1, 2, 3]


class Fixed(nn.Module):
    """A reducer whose tokens are their (row, position) coordinates."""

    def forward(self, image, tokens, question=None, cu_seqlens=None):
        rows = torch.arange(image.shape[0], dtype=torch.float32)[:, None].expand(-1, tokens)
        cols = torch.arange(tokens, dtype=torch.float32)[None].expand(image.shape[0], -1)
        return torch.stack([rows, cols], dim=-1)  # (B, tokens, 2)


def test_swapped_tokens_take_the_named_part_from_the_donor_row():
    tu = bench_script("token_usage")
    wrapper = tu.SwappedTokens(Fixed())
    image = torch.zeros(3, 9, 4)
    made = wrapper(image, 5)
    assert torch.equal(made, Fixed()(image, 5))
    wrapper.donor = torch.tensor([2, 0, 1])
    wrapper.part = "first"
    first = wrapper(image, 5)
    assert first[:, 0, 0].tolist() == [2, 0, 1] and torch.equal(first[:, 1:], made[:, 1:])
    wrapper.part = "rest"
    rest = wrapper(image, 5)
    assert torch.equal(rest[:, 0], made[:, 0])
    assert (rest[:, 1:, 0] == torch.tensor([2.0, 0, 1])[:, None]).all()
    assert torch.equal(rest[..., 1], made[..., 1])  # positions kept: whole tokens moved


def test_cli_needs_two_tokens():
    res = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "1"], capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode == 2 and "--tokens must be >= 2" in res.stderr


def test_swap_test_runs_through_the_engine():
    from tokengine.data.synthetic import normalize_answer, test_split
    from tokengine.engine import Engine
    from tokengine.models.tiny import IMAGE_SIZE, random_tiny

    tu = bench_script("token_usage")
    engine = Engine(random_tiny(seed=0))
    samples = test_split("chart", 6, IMAGE_SIZE)
    plain = engine.generate([s.image for s in samples], [s.question for s in samples],
                            tokens=16, reducer="fusion", max_new_tokens=4)  # fmt: skip
    engine.vlm.reducer = tu.SwappedTokens(engine.vlm.reducer)
    r = tu.swap_test(engine, "chart", "fusion", tokens=16, per_family=6, batch_size=3)
    made = [normalize_answer("chart", t) for t in plain.texts]
    assert r["as made"] == sum(m == s.answer for m, s in zip(made, samples, strict=True)) / 6
    assert r["n"] == 6 and 0 <= r["pairs_differ"] <= 6
    assert engine.vlm.reducer.part is None  # left as made
