"""Sweep: resumes after a kill with the same results; torchrun shards give the same scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tokengine import sweep

ARGS = [
    "--tokens",
    "1,16",
    "--reducer",
    "pool-avg,fusion",
    "--tasks",
    "existence",
    "colour",
    "--limit",
    "4",
    "--batch-size",
    "3",
    "--n-boot",
    "50",
    "--no-progress",
]


def scores(points: list[dict]) -> dict:
    return {
        (p["reducer"], p["tokens"], t): r["score"] for p in points for t, r in p["tasks"].items()
    }


def predictions(out) -> dict:
    """Every sample's prediction per point and task, from the sweep's samples files."""
    return {
        (d.name, f.name): f.read_text()
        for d in (out / "samples").iterdir()
        for f in sorted(d.iterdir())
    }


def test_killed_sweep_resumes_with_the_same_results(tmp_path):
    whole = sweep.main([*ARGS, "--output", str(tmp_path / "whole")])
    assert len(whole) == 4 and (tmp_path / "whole" / "report.md").is_file()

    resumed_dir = tmp_path / "resumed"
    first = sweep.main([*ARGS, "--output", str(resumed_dir), "--max-points", "1"])
    assert len(first) == 1 and not (resumed_dir / "report.md").exists()
    with open(resumed_dir / sweep.POINTS_FILE, "a") as f:
        f.write('{"reducer": "fusion", "tok')  # a point cut short by the kill
    resumed = sweep.main([*ARGS, "--output", str(resumed_dir)])
    assert scores(resumed) == scores(whole)
    assert predictions(resumed_dir) == predictions(tmp_path / "whole")
    lines = (resumed_dir / sweep.POINTS_FILE).read_text().splitlines()
    assert sum(1 for line in lines if line.startswith('{"reducer": "pool-avg", "tokens": 1,')) == 1
    fits = json.loads((resumed_dir / "fits.json").read_text())
    assert {(f["task"], f["reducer"]) for f in fits} == {
        (t, r) for t in ("synth/existence", "synth/colour") for r in ("pool-avg", "fusion")
    }
    assert (resumed_dir / "sweep.png").stat().st_size > 0


def test_every_point_is_checked_before_the_first_runs(tmp_path):
    argv = [*ARGS, "--output", str(tmp_path)]
    argv[argv.index("1,16")] = "1,577"
    with pytest.raises(ValueError, match="tokens must be in 1..576"):
        sweep.main(argv)
    assert not (tmp_path / sweep.POINTS_FILE).exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tokens", "4,16,4"], "--tokens names 4 more than once"),
        (["--reducer", "fusion,pool-avg,fusion"], "--reducer names fusion more than once"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-points", "-1"], "--max-points must be >= 0, got -1"),
        (["--n-boot", "0"], "--n-boot must be >= 1, got 0"),
    ],
)
def test_sweep_cli_names_the_bad_argument(flags, message, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(flags)
    assert message in capsys.readouterr().err


def test_torchrun_two_ranks_match_one_process(tmp_path):
    single = sweep.main([*ARGS, "--output", str(tmp_path / "one")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free rendezvous port: a fixed one collides with other runs
            "--nproc-per-node",
            "2",
            "-m",
            "tokengine.sweep",
            *ARGS,
            "--output",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    two = sweep.read_points(tmp_path / "two" / sweep.POINTS_FILE)
    assert scores(two) == scores(single)
    assert predictions(tmp_path / "two") == predictions(tmp_path / "one")
    assert all(r["n"] == 4 for p in two for r in p["tasks"].values())


def test_power_law_verdict_needs_three_points():
    """Two points above chance fit exactly (R² = 1), so the verdict falls back to all points."""
    from tokengine.scaling import fit_power_law

    tokens, scores_ = [1, 4, 16, 64], [30.0, 12.0, 10.0, 11.0]  # chance 10: two points above
    entry = {
        "all": fit_power_law(tokens, scores_, n_boot=20).to_dict(),
        "above_chance": fit_power_law(tokens[:2], scores_[:2], n_boot=20).to_dict(),
    }
    assert entry["above_chance"]["r2"] == 1.0
    assert sweep.verdict(entry).startswith("does not hold") and "4 points" in sweep.verdict(entry)
    power = [100 * n**-0.3 for n in tokens]  # an exact power law over all four points
    exact = fit_power_law(tokens, power, n_boot=20).to_dict()
    assert sweep.verdict({"all": exact, "above_chance": exact}).startswith("holds")
    two = {"all": entry["above_chance"], "above_chance": entry["above_chance"]}
    assert sweep.verdict(two) == "cannot be judged (only 2 points)"


def test_sweep_refuses_an_unusable_output_before_the_first_point(tmp_path, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("ran a point before the --output check")

    monkeypatch.setattr(sweep.tk_eval, "run_task", no_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError):
        sweep.main([*ARGS, "--output", str(blocker / "out")])
