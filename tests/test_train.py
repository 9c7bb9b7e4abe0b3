"""tokengine-tiny: tokenizer, random model, training CLI on a tiny budget, shipped weights."""

from __future__ import annotations

import json
import math
import re
from itertools import islice
from pathlib import Path

import pytest
import torch

from tokengine.data.synthetic import (
    FAMILIES,
    answer_vocabulary,
    normalize_answer,
    test_split,
    train_stream,
)
from tokengine.engine import Engine
from tokengine.models import VLM
from tokengine.models.tiny import (
    EOS_ID,
    IMAGE_ID,
    IMAGE_SIZE,
    UNK_ID,
    available_models,
    build_tokenizer,
    random_tiny,
    shipped_path,
)


def answer_test_questions(vlm: VLM, family: str, n: int, tokens: int, max_new_tokens: int):
    """The Engine's fusion answers to the first ``n`` test-split questions of ``family``."""
    samples = test_split(family, n, vlm.config.vision.image_size)
    images, questions = [s.image for s in samples], [s.question for s in samples]
    return Engine(vlm).generate(
        images, questions, tokens=tokens, reducer="fusion", max_new_tokens=max_new_tokens
    )


def test_tokenizer_round_trips_every_answer():
    tok = build_tokenizer()
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>", "<image>")] == [
        0,
        1,
        2,
        3,
        4,
    ]
    for family in FAMILIES:
        for answer in answer_vocabulary(family):
            ids = tok.encode(answer, add_special_tokens=False).ids
            assert len(ids) == 1 and UNK_ID not in ids, (family, answer)
            text = tok.decode([*ids, EOS_ID], skip_special_tokens=True).strip()
            assert normalize_answer(family, text) == answer, (family, answer, text)


def test_tokenizer_covers_questions_and_prompt():
    tok = build_tokenizer()
    assert build_tokenizer().to_str() == tok.to_str()  # deterministic
    for s in islice(train_stream(3, 48), 400):
        enc = tok.encode(f"USER: <image>\n{s.question} ASSISTANT:")
        assert UNK_ID not in enc.ids, s.question
        assert enc.ids[0] == 1 and enc.ids.count(IMAGE_ID) == 1


def test_random_tiny_builds_and_runs():
    vlm = random_tiny(0)
    assert vlm.reducer is not None and vlm.tokenizer is not None
    assert vlm.config.num_image_tokens == 576
    res = answer_test_questions(vlm, "colour", 2, tokens=4, max_new_tokens=2)
    assert len(res.texts) == 2


def test_training_forward_matches_engine():
    """The right-padded causal training forward gives the Engine's greedy first token."""
    from tokengine.training.cache import _records, encode_samples
    from tokengine.training.stage_c import lm_batch

    vlm = random_tiny(1)
    samples = test_split(["counting", "chart"], 2, vlm.config.vision.image_size)
    recs = _records(vlm, samples)
    feats = torch.from_numpy(encode_samples(vlm, samples)).float()
    for reducer, tokens in (("fusion", 16), ("fusion-noq", 1), ("pool-avg", 64)):
        with torch.no_grad():
            logits, _ = lm_batch(vlm, feats, recs, tokens, reducer)
        res = Engine(vlm).generate(
            [s.image for s in samples], [s.question for s in samples], tokens=tokens,
            reducer=reducer, max_new_tokens=1, batch_size=4,
        )  # fmt: skip
        first = [ids[0] if ids else EOS_ID for ids in res.token_ids]
        assert logits[:, 0].argmax(-1).tolist() == first


def test_train_cli_lowers_loss_and_writes_a_loadable_checkpoint(tmp_path):
    from tokengine.train import main

    out = tmp_path / "model"
    argv = [
        "--output", str(out), "--cache", str(tmp_path / "cache"), "--vision-steps", "2",
        "--vision-batch-size", "8", "--cache-samples", "48", "--val-samples", "8",
        "--steps", "20", "--batch-size", "8", "--tokens", "1,4,16", "--lr", "5e-3",
        "--warmup", "1", "--seed", "0", "--save-every", "0",
    ]  # fmt: skip
    summary = main(argv)
    hist_first, hist_last = summary["stage_c"]["loss_first"], summary["stage_c"]["loss_last"]
    assert sum(hist_last[-5:]) / 5 < sum(hist_first[:5]) / 5
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
              "tokengine_config.json", "training.json", "MODEL_CARD.md"):  # fmt: skip
        assert (out / f).is_file(), f
    assert json.loads((out / "tokengine_config.json").read_text())["reducer"]["num_queries"] == 576
    card = (out / "MODEL_CARD.md").read_text()
    assert " ".join(argv) in card and "20 steps" in card
    vlm = VLM.from_pretrained(out)
    res = answer_test_questions(vlm, "shape", 2, tokens=16, max_new_tokens=3)
    assert len(res.texts) == 2 and all(isinstance(t, str) for t in res.texts)


def test_train_cli_continues_a_model_and_scores_it_afterwards(tmp_path):
    """``--init`` with no cache caches the grids of the model's own ViT (stage a is skipped);
    ``--test-only`` scores a saved model on the test split and puts the scores in its card."""
    from tokengine.train import main

    first, second = tmp_path / "first", tmp_path / "second"
    small = ["--cache-samples", "24", "--val-samples", "8", "--steps", "3", "--batch-size",
             "8", "--tokens", "1,4", "--warmup", "1", "--save-every", "0",
             "--val-every", "0"]  # fmt: skip
    main(["--output", str(first), "--cache", str(tmp_path / "c1"), "--vision-steps", "2",
          "--vision-batch-size", "8", *small])  # fmt: skip
    summary = main(["--output", str(second), "--cache", str(tmp_path / "c2"), "--init",
                    str(first), *small])  # fmt: skip
    assert summary["cache"]["stage_a"] == json.loads((first / "training.json").read_text())[
        "cache"]["stage_a"]  # fmt: skip
    cached = torch.load(tmp_path / "c2" / "vision.pt")
    trained = VLM.from_pretrained(first).vision.state_dict()
    assert cached.keys() == trained.keys()
    assert all(torch.equal(cached[k], trained[k]) for k in trained)

    (second / "train.log").write_bytes(b"x" * 2**23)  # a log copied in: not the checkpoint
    scored = main(["--output", str(second), "--test-only", "--test-per-family", "2"])
    assert set(scored["test"]) == {"fusion@576", "pool-avg@576", "fusion@1", "pool-avg@1"}
    card = (second / "MODEL_CARD.md").read_text()
    assert "Test split scored afterwards with `python -m tokengine.train --output" in card
    assert "mean >= 0.70 at N_l=576" in card
    on_disk = float(re.search(r"; ([0-9.]+) MiB on disk", card).group(1))
    assert 0 < on_disk < 8
    assert json.loads((second / "training.json").read_text())["test"] == scored["test"]
    with pytest.raises(SystemExit, match="training.json"):
        main(["--output", str(tmp_path / "nothing"), "--test-only"])


def test_train_cli_select_image_makes_and_continues_such_a_reducer(tmp_path):
    """``--select-image`` trains a reducer with that readout; it is saved in the model's config,
    and ``--init`` from that model continues it (the readout's weights included)."""
    from tokengine.train import main

    first, second = tmp_path / "first", tmp_path / "second"
    small = ["--cache", str(tmp_path / "c"), "--cache-samples", "16", "--val-samples", "8",
             "--steps", "2", "--batch-size", "8", "--tokens", "1,4", "--warmup", "1",
             "--save-every", "0", "--val-every", "0"]  # fmt: skip
    main(["--output", str(first), "--vision-steps", "1", "--vision-batch-size", "8",
          "--select-image", *small])  # fmt: skip
    trained = VLM.from_pretrained(first)
    assert trained.reducer.config.select_image
    assert "(`select_image`)" in (first / "MODEL_CARD.md").read_text()
    main(["--output", str(second), "--init", str(first), *small])
    continued = VLM.from_pretrained(second)
    assert continued.reducer.config.select_image
    w = "reducer.select.o_proj.weight"
    assert not torch.equal(continued.state_dict()[w], trained.state_dict()[w])  # trained on


def test_attend_loss_by_hand():
    from tokengine.training.stage_c import attend_loss

    # rows: image mass summing to 1, to 0.4 (the rest went to the question), no target
    mass = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.2, 0.1, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    recs = [{"attend": [0]}, {"attend": [0, 1]}, {}]
    want = -(math.log(0.5) + math.log(0.3 / 0.4)) / 3
    assert attend_loss(mass, recs).item() == pytest.approx(want)
    assert attend_loss(mass, [{}, {}, {}]).item() == 0.0


def test_train_cli_attend_weight_trains_on_the_cached_patches(tmp_path):
    """Caches name the asked character's patches of each text record; ``--attend-weight``
    adds a loss on them (the same run without it ends with other weights), and a cache
    without them is refused."""
    from tokengine.data.synthetic import asked_cells, train_sample
    from tokengine.train import main

    cache = tmp_path / "c"
    small = ["--cache", str(cache), "--cache-samples", "16", "--val-samples", "8", "--steps",
             "2", "--batch-size", "8", "--tokens", "1,4", "--warmup", "1", "--save-every", "0",
             "--val-every", "0", "--pool-share", "0", "--vision-steps", "1",
             "--vision-batch-size", "8"]  # fmt: skip
    without = main(["--output", str(tmp_path / "without"), *small])
    recs = json.loads((cache / "records.json").read_text())
    first = without["cache"]["stage_a"]["images"]  # the cache's first stream index
    for i, r in enumerate(recs):
        if FAMILIES[r["family"]] == "text":
            assert r["attend"] == asked_cells(train_sample(0, first + i, IMAGE_SIZE)).tolist()
        else:
            assert "attend" not in r
    main(["--output", str(tmp_path / "with"), "--attend-weight", "1", *small])
    w = "reducer.blocks.1.cross_attn.q_proj.weight"
    a, b = (VLM.from_pretrained(tmp_path / d).state_dict()[w] for d in ("without", "with"))
    assert not torch.equal(a, b)
    (cache / "records.json").write_text(json.dumps([
        {k: v for k, v in r.items() if k != "attend"} for r in recs
    ]))  # fmt: skip
    with pytest.raises(ValueError, match="--attend-weight: the cache .* names no asked patches"):
        main(["--output", str(tmp_path / "refused"), "--attend-weight", "1", *small])


def test_train_cli_init_continues_a_reducer_of_another_shape(tmp_path):
    """``--init`` continues the model as saved: a reducer with more blocks than
    ``random_tiny``'s keeps them all, and trains them."""
    from dataclasses import replace

    from tokengine.models.reducer import FusionReducer
    from tokengine.train import main

    first, deeper, second = tmp_path / "first", tmp_path / "deeper", tmp_path / "second"
    small = ["--cache", str(tmp_path / "c"), "--cache-samples", "16", "--val-samples", "8",
             "--steps", "2", "--batch-size", "8", "--tokens", "1,4", "--warmup", "1",
             "--save-every", "0", "--val-every", "0"]  # fmt: skip
    main(["--output", str(first), "--vision-steps", "1", "--vision-batch-size", "8", *small])
    vlm = VLM.from_pretrained(first)
    cfg = vlm.reducer.config
    grown = FusionReducer(replace(cfg, num_layers=cfg.num_layers + 1))
    missing = grown.load_state_dict(vlm.reducer.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(f"blocks.{cfg.num_layers}.") for k in missing)
    vlm.reducer = grown
    vlm.save_pretrained(deeper)
    main(["--output", str(second), "--init", str(deeper), *small])
    continued = VLM.from_pretrained(second)
    assert continued.reducer.config.num_layers == cfg.num_layers + 1
    w = f"reducer.blocks.{cfg.num_layers}.mlp.0.weight"
    assert not torch.equal(continued.state_dict()[w], VLM.from_pretrained(deeper).state_dict()[w])


def test_train_cli_vision_from_takes_only_the_vit(tmp_path, monkeypatch):
    """``--vision-from`` skips stage a and caches with the given model's ViT, and stage c starts
    from the seed's initialisation of everything else (not from that model's)."""
    import tokengine.train as train
    from tokengine.models.tiny import random_tiny

    first = tmp_path / "first"
    small = ["--cache-samples", "16", "--val-samples", "8", "--steps", "1", "--batch-size",
             "8", "--tokens", "1", "--warmup", "1", "--save-every", "0",
             "--val-every", "0"]  # fmt: skip
    train.main(["--output", str(first), "--cache", str(tmp_path / "c1"), "--vision-steps", "2",
                "--vision-batch-size", "8", "--seed", "1", *small])  # fmt: skip
    started = {}
    original = train.train_lm

    def spy(vlm, *args, **kwargs):
        started.update({k: v.clone() for k, v in vlm.state_dict().items()})
        return original(vlm, *args, **kwargs)

    monkeypatch.setattr(train, "train_lm", spy)
    summary = train.main(["--output", str(tmp_path / "second"), "--cache", str(tmp_path / "c2"),
                          "--vision-from", str(first), "--seed", "0", *small])  # fmt: skip
    assert summary["cache"]["stage_a"] == json.loads((first / "training.json").read_text())[
        "cache"]["stage_a"]  # fmt: skip
    lent = VLM.from_pretrained(first).state_dict()
    fresh = random_tiny(0).state_dict()
    assert started.keys() == fresh.keys()
    for name, value in started.items():
        expected = lent[name] if name.startswith("vision.") else fresh[name]
        assert torch.equal(value, expected), name
    assert not torch.equal(lent["reducer.queries"], fresh["reducer.queries"])  # seeds 1 vs 0

    other = tmp_path / "other"  # another ViT, on the cache the first one made
    random_tiny(3).save_pretrained(other)
    (other / "training.json").write_text((first / "training.json").read_text())
    with pytest.raises(SystemExit, match="holds grids made by another ViT than"):
        train.main(["--output", str(tmp_path / "third"), "--cache", str(tmp_path / "c1"),
                    "--vision-from", str(other), *small])  # fmt: skip


def dies_after(calls: int, real):
    """``real``, which raises KeyboardInterrupt (a kill) when called the ``calls + 1``-th time."""
    made = []

    def call(*args):
        made.append(1)
        if len(made) > calls:
            raise KeyboardInterrupt
        return real(*args)

    return call


def killed_in_stage_c(monkeypatch, run, out: Path) -> None:
    """``run(out)`` killed at stage c's fifth optimiser step (after a save at step 3)."""
    from tokengine.training import stage_c

    real_step = stage_c.optimizer_step
    monkeypatch.setattr(stage_c, "optimizer_step", dies_after(4, real_step))
    with pytest.raises(KeyboardInterrupt):
        run(out)
    monkeypatch.setattr(stage_c, "optimizer_step", real_step)


def test_train_cli_resumed_after_an_interruption_ends_as_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    """Killed after its state was saved at step 3, a ``--resume`` run ends with the same weights
    as one that ran its 7 steps at once (shuffled order, RNGs, optimiser and probe restored):
    the cache (24 samples, weighted to 30) is passed twice, so the order after a reshuffle
    counts too."""
    import tokengine.train as train

    def run(out: Path, *extra: str) -> None:
        train.main(["--output", str(out), "--cache", str(tmp_path / "cache"), "--vision-steps",
                    "2", "--vision-batch-size", "8", "--cache-samples", "24", "--val-samples",
                    "8", "--steps", "7", "--batch-size", "8", "--min-batch", "8", "--tokens",
                    "1,4", "--warmup", "1", "--save-every", "3", "--val-every", "0",
                    "--family-weights", "text=2,chart=3", *extra])  # fmt: skip

    run(tmp_path / "whole")
    killed_in_stage_c(monkeypatch, run, tmp_path / "split")
    assert torch.load(tmp_path / "split" / train.STATE_FILE, weights_only=False)["step"] == 3
    run(tmp_path / "split", "--resume")
    whole = VLM.from_pretrained(tmp_path / "whole").state_dict()
    split = VLM.from_pretrained(tmp_path / "split").state_dict()
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    summary = json.loads((tmp_path / "split" / "training.json").read_text())
    assert summary["stage_c"]["steps"] == 7 and summary["stage_c"]["samples_seen"] == 56


def test_train_cli_resumes_stage_a_and_then_stage_b(tmp_path, monkeypatch):
    """Killed in stage a after its state was saved at step 3, then again in stage b, a run
    continued with ``--resume`` ends with the same ViT and model as one that ran at once, and
    does not train stage a twice; a resume with another stage-a seed is refused."""
    import tokengine.train as train
    from tokengine.training import vision

    def run(name: str, *extra: str) -> None:
        train.main(["--output", str(tmp_path / name), "--cache", str(tmp_path / f"cache-{name}"),
                    "--vision-steps", "5", "--vision-batch-size", "4", "--cache-samples", "8",
                    "--val-samples", "8", "--steps", "2", "--batch-size", "8", "--min-batch",
                    "8", "--tokens", "1,4", "--warmup", "1", "--save-every", "3",
                    "--val-every", "0", *extra])  # fmt: skip

    run("whole")
    real_step, real_build = vision.optimizer_step, train.build_cache
    monkeypatch.setattr(vision, "optimizer_step", dies_after(4, real_step))
    with pytest.raises(KeyboardInterrupt):
        run("split")
    state = tmp_path / "cache-split" / vision.STAGE_A_STATE
    assert torch.load(state, weights_only=False)["step"] == 3
    monkeypatch.setattr(vision, "optimizer_step", real_step)
    monkeypatch.setattr(train, "build_cache", dies_after(0, real_build))
    with pytest.raises(KeyboardInterrupt):
        run("split", "--resume")
    assert (tmp_path / "cache-split" / vision.STAGE_A_DONE).is_file() and not state.exists()
    with pytest.raises(SystemExit, match="other settings"):
        run("split", "--resume", "--seed", "1")
    monkeypatch.setattr(train, "build_cache", real_build)
    # stage a must not train again
    monkeypatch.setattr(vision, "optimizer_step", dies_after(0, real_step))
    run("split", "--resume")
    vit = [torch.load(tmp_path / f"cache-{n}" / "vision.pt") for n in ("whole", "split")]
    assert vit[0].keys() == vit[1].keys()
    assert all(torch.equal(vit[0][k], vit[1][k]) for k in vit[0])
    whole = VLM.from_pretrained(tmp_path / "whole").state_dict()
    split = VLM.from_pretrained(tmp_path / "split").state_dict()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    stage_a = json.loads((tmp_path / "split" / "training.json").read_text())["cache"]["stage_a"]
    assert stage_a["steps"] == 5 and stage_a["images"] == 20


def test_chain_state_carries_a_killed_run_to_a_new_disk(tmp_path, monkeypatch):
    """``bench/cpu_chain_state.sh`` saves a chain killed in stage c without its feature cache;
    restored into another directory, the run resumes at its saved step (rebuilding the cache
    from the saved ViT, not training it again) and ends with the same weights as an
    uninterrupted run."""
    import subprocess

    import tokengine.train as train
    from tokengine.training import stage_c, vision

    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_chain_state.sh"

    def run(chain: Path, *extra: str) -> None:
        train.main(["--output", str(chain / "s1"), "--cache", str(chain / "cache"),
                    "--vision-steps", "2", "--vision-batch-size", "4", "--cache-samples", "16",
                    "--val-samples", "8", "--steps", "5", "--batch-size", "8", "--min-batch",
                    "8", "--tokens", "1,4", "--warmup", "1", "--save-every", "3",
                    "--val-every", "0", *extra])  # fmt: skip

    run(tmp_path / "whole")
    killed_in_stage_c(monkeypatch, run, tmp_path / "killed")
    state = tmp_path / "state"
    subprocess.run(["bash", script, "save", tmp_path / "killed", state], check=True)
    carried = {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()}
    assert carried == {"cache/stage_a.json", "cache/vision.pt", f"s1/{train.STATE_FILE}"}
    subprocess.run(["bash", script, "restore", state, tmp_path / "new"], check=True)
    # neither stage a nor stage c's first 3 steps may run again
    monkeypatch.setattr(vision, "optimizer_step", dies_after(0, vision.optimizer_step))
    monkeypatch.setattr(stage_c, "optimizer_step", dies_after(2, stage_c.optimizer_step))
    run(tmp_path / "new", "--resume")
    whole = VLM.from_pretrained(tmp_path / "whole" / "s1").state_dict()
    new = VLM.from_pretrained(tmp_path / "new" / "s1").state_dict()
    assert whole.keys() == new.keys()
    assert all(torch.equal(whole[k], new[k]) for k in whole)


def _run_chain(tmp_path: Path, env: dict[str, str]) -> list[list[str]]:
    """The ``python`` command lines one call of ``bench/cpu_chain.sh tmp_path/chain 3`` runs,
    with a stand-in ``python`` on PATH that records its arguments and writes the
    ``training.json`` that marks a step done."""
    import os
    import subprocess

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        calls.mkdir()
        fake = bin_dir / "python"
        fake.write_text('#!/usr/bin/env bash\nn=$(ls "$CALLS" | wc -l)\n'
                        'printf "%s\\n" "$@" > "$CALLS/$(printf %03d "$n")"\n'
                        'while [ $# -gt 0 ]; do\n  if [ "$1" = --output ]; then mkdir -p "$2"; '
                        'touch "$2/training.json"; fi\n  shift\ndone\n')  # fmt: skip
        fake.chmod(0o755)
    before = set(calls.iterdir())
    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_chain.sh"
    run_env = {**os.environ, **env, "CALLS": str(calls), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", script, tmp_path / "chain", "3"], check=True, env=run_env,
                   capture_output=True)  # fmt: skip
    new = sorted(set(calls.iterdir()) - before)
    return [f.read_text().split("\n")[:-1] for f in new]


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_cpu_chain_runs_seven_steps_each_continuing_the_last(tmp_path):
    cmds = _run_chain(tmp_path, {})
    chain = tmp_path / "chain"
    steps = [str(chain / f"s{i}") for i in range(1, 8)]
    assert [_flag(c, "--output") for c in cmds] == steps
    assert [_flag(c, "--init") for c in cmds] == [None, *steps[:-1]]
    assert all(_flag(c, "--variant") == "fusion" and _flag(c, "--seed") == "3" for c in cmds)
    assert all(_flag(c, "--cache") == str(chain / "cache") for c in cmds)
    assert not any("--select-image" in c for c in cmds)
    assert _run_chain(tmp_path, {}) == []  # every step is done: a second call runs nothing


def test_cpu_chain_partner_settings_reach_its_steps(tmp_path):
    """CACHE, VARIANT and SELECT make a partner of a chain: another chain's cache for every
    step, the variant for every step, and the select readout for the new reducer of ``s1``
    only (train refuses it with --init)."""
    other = str(tmp_path / "other" / "cache")
    cmds = _run_chain(tmp_path, {"CACHE": other, "VARIANT": "fusion-noq", "SELECT": "1"})
    assert len(cmds) == 7
    assert all(_flag(c, "--cache") == other and _flag(c, "--variant") == "fusion-noq" for c in cmds)
    assert ["--select-image" in c for c in cmds] == [True] + [False] * 6


def test_family_weights_repeat_a_family_in_the_order():
    from tokengine.training.stage_c import parse_family_weights, weighted_order

    recs = [{"family": i % len(FAMILIES)} for i in range(2 * len(FAMILIES))]
    assert weighted_order(recs, parse_family_weights(None)) == list(range(len(recs)))
    weights = parse_family_weights("text=3,counting=2")
    assert weights["text"] == 3 and weights["counting"] == 2 and weights["colour"] == 1
    order = weighted_order(recs, weights)
    assert order[: len(recs)] == list(range(len(recs)))  # the first pass in stream order
    text, counting = FAMILIES.index("text"), FAMILIES.index("counting")
    for i, r in enumerate(recs):
        assert order.count(i) == {text: 3, counting: 2}.get(r["family"], 1)


def test_validation_split_is_the_validation_stream_by_family():
    """Per family, the validation split is the validation stream's samples of that family in
    order (so its head is the cached validation set), and shares no scene with the training
    stream or the test split."""
    from tokengine.training.common import VAL_STREAM_OFFSET
    from tokengine.training.scoring import validation_split

    size = random_tiny(0).config.vision.image_size
    stream = list(islice(train_stream(VAL_STREAM_OFFSET, size), 3 * len(FAMILIES)))
    training = {s.uid for s in islice(train_stream(0, size), 3 * len(FAMILIES))}
    for k, fam in enumerate(FAMILIES):
        split = validation_split(fam, 3)
        assert [s.uid for s in split] == [s.uid for s in stream[k :: len(FAMILIES)]]
        assert all(s.family == fam for s in split)
        uids = {s.uid for s in split}
        assert not uids & training and not uids & {s.uid for s in test_split(fam, 200, size)}


def test_evaluate_names_a_bad_split(tmp_path):
    from tokengine.training.scoring import evaluate_split

    with pytest.raises(ValueError, match="split must be 'test' or 'val', got 'train'"):
        evaluate_split(tmp_path, "fusion", 1, split="train")


def test_worker_made_batches_are_the_stream_in_order():
    """Stage a's and b's batches from two DataLoader workers equal those made in-process, and
    both are the training stream's samples, in order (a short last batch included)."""
    from functools import partial

    from tokengine.training.cache import cache_batch
    from tokengine.training.common import stream_batches

    vlm = random_tiny(0)
    prepare = partial(cache_batch, processor=vlm.image_processor)
    here = list(stream_batches(5, 3, 14, 4, prepare, workers=0))
    there = list(stream_batches(5, 3, 14, 4, prepare, workers=2))
    assert [len(b[1]) for b in here] == [4, 4, 3]
    stream = list(islice(train_stream(5, vlm.config.vision.image_size), 14))[3:]
    assert [s.uid for _, b in here for s in b] == [s.uid for s in stream]
    assert [s.uid for _, b in there for s in b] == [s.uid for s in stream]
    for (pa, _), (pb, _) in zip(here, there, strict=True):
        assert torch.equal(pa, pb)
    pixels = torch.cat([p for p, _ in here])
    assert torch.equal(pixels, vlm.image_processor([s.image for s in stream]))


@pytest.mark.parametrize("name", ["tokengine-tiny", "tokengine-tiny-noq"])
def test_shipped_checkpoint_loads(name):
    path = shipped_path(name)
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{name} is not shipped in this checkout")
    assert name in available_models()
    vlm = VLM.from_pretrained(path)
    res = answer_test_questions(vlm, "colour", 4, tokens=576, max_new_tokens=3)
    assert len(res.texts) == 4


def test_clearly_lower_needs_more_than_sampling_noise():
    from tokengine.training.scoring import clearly_lower

    # 200 questions at 35.5%: one standard error is 3.4 points
    assert not clearly_lower(0.32, 0.355, 200)
    assert clearly_lower(0.25, 0.355, 200)
    assert not clearly_lower(0.40, 0.355, 200)
    assert not clearly_lower(0.05, 0.055, 200)


def test_stage_c_lr_warms_up_holds_then_decays():
    from tokengine.training.stage_c import stage_c_lr

    assert stage_c_lr(1.0, 0, 0.0, 10, 0.0) == pytest.approx(0.1)  # warm-up
    assert stage_c_lr(1.0, 50, 0.0, 10, 0.0) == pytest.approx(1.0)
    assert stage_c_lr(1.0, 50, 0.5, 10, 0.0) == pytest.approx(0.525)  # cosine from the start
    assert stage_c_lr(1.0, 50, 0.5, 10, 0.7) == pytest.approx(1.0)  # held until decay_start
    assert stage_c_lr(1.0, 50, 0.85, 10, 0.7) == pytest.approx(0.525)
    assert stage_c_lr(1.0, 50, 1.0, 10, 0.7) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--device", "gpu"], "--device: "),
        (["--decay-start", "1"], "--decay-start must be in [0, 1)"),
        (["--family-weights", "text=0"], "--family-weights: expected FAMILY=N"),
        (["--family-weights", "texts=2"], "got 'texts=2'"),
        (["--tokens", "1,0"], "--tokens: each N_l must be in 1..576, got 0"),
        (["--tokens", "577"], "--tokens: each N_l must be in 1..576, got 577"),
        (["--tokens", "1,x"], "--tokens: expected comma-separated integers, got '1,x'"),
        (["--tokens", "575"], "tokens=575 needs a 23x25 output grid"),  # pooled batches
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--warmup", "0"], "--warmup must be >= 1, got 0"),
        (["--minutes", "-1"], "--minutes must be >= 0, got -1.0"),
        (["--minutes", "0"], "--minutes must be > 0 when --steps is not given, got 0.0"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--pool-share", "1.5"], "--pool-share must be in [0, 1], got 1.5"),
        (["--init", "/nowhere/model"], "--init /nowhere/model is not a model directory"),
        (["--vision-from", "/nowhere/model"], "--vision-from /nowhere/model is not a model"),
        (["--init", "a", "--vision-from", "b"], "not allowed with argument --init"),
        (["--init", "a", "--select-image"], "--select-image: a model given by --init keeps its"),
        (["--attend-weight", "-1"], "--attend-weight must be >= 0, got -1.0"),
        (["--variant", "fusion-noq", "--attend-weight", "1"], "--attend-weight needs --variant"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "sees no CUDA device")]),
)
def test_train_cli_names_the_bad_argument(flags, message, capsys):
    from tokengine.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--output", "unused", *flags])
    assert message in capsys.readouterr().err


def test_train_refuses_a_zero_stage_a_budget_where_stage_a_runs(tmp_path):
    from tokengine.train import main

    cache = tmp_path / "cache"
    argv = ["--output", str(tmp_path / "m"), "--cache", str(cache), "--steps", "1"]
    with pytest.raises(SystemExit, match="--vision-minutes must be > 0 when --vision-steps"):
        main([*argv, "--vision-minutes", "0"])
    assert not cache.exists()  # refused before any work


def test_train_tokens_need_not_pool_without_pooled_batches():
    from tokengine.train import parse_args
    from tokengine.training.stage_c import parse_tokens

    args = parse_args(["--output", "unused", "--tokens", "575,1", "--pool-share", "0"])
    assert parse_tokens(args.tokens, pool=False) == [575, 1]
    assert parse_tokens(None, pool=True) == [1, 4, 16, 64, 144, 256, 576]


def test_select_by_validation_picks_the_highest_and_breaks_ties_to_the_first(tmp_path):
    import shutil
    import subprocess
    import sys

    shipped = shipped_path("tokengine-tiny")
    if not (shipped / "model.safetensors").is_file():
        pytest.skip("tokengine-tiny is not shipped in this checkout")
    untrained, older, newer = tmp_path / "untrained", tmp_path / "older", tmp_path / "newer"
    random_tiny(0).save_pretrained(untrained)
    for d in (older, newer):
        shutil.copytree(shipped, d)
    script = Path(__file__).parents[1] / "bench" / "select_by_validation.py"
    cmd = [sys.executable, str(script), "--per-family", "1", "--json", str(tmp_path / "s.json")]
    res = subprocess.run(
        [*cmd, str(untrained), str(older), str(newer)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    scores = {Path(d).name: s["mean"] for d, s in report["scores"].items()}
    assert scores["older"] == scores["newer"] > scores["untrained"]  # the same trained weights
    assert report["best"] == str(older)
    assert all(f"| {name} | " in res.stdout for name in scores)
    bad = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a model directory" in bad.stderr
