"""python -m tokengine.eval end to end on a few samples, synthetic and VLMEvalKit TSV."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from tokengine import eval as tk_eval


def write_pope_tsv(path, n=4):
    rows = ["index\timage\tquestion\tanswer\tcategory"]
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (60 * i, 100, 200)).save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()
        rows.append(f"{i}\t{b64}\tIs there a dog in the image?\t{'yes' if i % 2 else 'no'}\trandom")
    path.write_text("\n".join(rows) + "\n")


def test_eval_synthetic_writes_results_and_samples(tmp_path, capsys):
    results = tk_eval.main(
        [
            "--tokens",
            "16",
            "--tasks",
            "existence",
            "colour",
            "--limit",
            "3",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert "synth/existence" in out and "TTFT p50" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tasks"].keys() == {"synth/existence", "synth/colour"}
    assert saved == json.loads(json.dumps(results))
    for task in saved["tasks"].values():
        assert task["n"] == 3 and task["image_tokens"] == 16
        assert 0 <= task["score"] <= 100 and task["chance"] >= 100 / 3
    lines = (tmp_path / "samples_synth_colour.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]).keys() == {"index", "question", "answer", "prediction", "correct"}
    if saved["config"]["random_init"]:
        assert "RANDOMLY INITIALISED" in out


def test_eval_vlmevalkit_tsv(tmp_path):
    tsv = tmp_path / "POPE.tsv"
    write_pope_tsv(tsv)
    results = tk_eval.main(
        [
            "--tokens",
            "4",
            "--reducer",
            "pool-avg",
            "--tasks",
            str(tsv),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    pope = results["tasks"]["POPE"]
    assert pope["metric"] == "f1" and pope["n"] == 4
    assert {"acc", "precision", "recall", "yes_ratio"} <= pope["metrics"].keys()
    assert (tmp_path / "out" / "samples_POPE.jsonl").is_file()


@pytest.mark.parametrize(
    "argv,error,match",
    [
        (["--tasks", "nonsense"], ValueError, "unknown task"),
        (["--tasks", "/nowhere/MME.tsv"], FileNotFoundError, "MME.tsv"),
        (["--tasks", "/nowhere/scores.tsv"], FileNotFoundError, "not found: '/nowhere/scores"),
        (["--model", "/nowhere/model"], FileNotFoundError, "neither a shipped model"),
        (["--tokens", "577"], ValueError, "tokens must be in 1..576"),
        (["--tokens", "64", "--reducer", "none"], ValueError, "keeps all 576 tokens"),
    ],
)
def test_eval_errors(argv, error, match, tmp_path):
    with pytest.raises(error, match=match):
        tk_eval.main([*argv, "--output", str(tmp_path), "--no-progress"])


def test_eval_tsv_missing_columns(tmp_path):
    tsv = tmp_path / "MME.tsv"
    tsv.write_text("index\tquestion\n0\tIs it?\n")
    with pytest.raises(ValueError, match="missing"):
        tk_eval.main(["--tasks", str(tsv), "--output", str(tmp_path), "--no-progress"])


def test_eval_cli_reports_errors_cleanly(tmp_path):
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "tokengine.eval", "--tasks", "nonsense", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "error: unknown task" in res.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
        (["--tokens", "0"], "--tokens must be >= 1, got 0"),
    ],
)
def test_eval_cli_names_the_bad_argument(argv, message, capsys):
    with pytest.raises(SystemExit):
        tk_eval.parse_args(argv)
    assert message in capsys.readouterr().err


def test_generate_cli_reports_errors_cleanly():
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "tokengine.generate", "--image", "/nowhere/scene.png",
         "--question", "What colour is it?", "--tokens", "16"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert res.returncode == 1 and res.stderr.startswith("error: image file")


def test_generate_cli_answers_one_question(tmp_path, capsys):
    from tokengine import generate
    from tokengine.data.synthetic import test_split

    sample = test_split("colour", n_per_family=1, image_size=96)[0]
    path = tmp_path / "scene.png"
    sample.image.save(path)
    assert (
        generate.main(
            [
                "--image",
                str(path),
                "--question",
                sample.question,
                "--tokens",
                "16",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip()  # the answer
    assert "fusion, N_l=16" in captured.err and "TTFT" in captured.err


def test_eval_refuses_an_unusable_output_before_evaluating(tmp_path, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("evaluated before the --output check")

    monkeypatch.setattr(tk_eval, "run_task", no_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError):
        tk_eval.main(["--tasks", "colour", "--limit", "2", "--output", str(blocker / "out")])
