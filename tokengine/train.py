"""Train tokengine-tiny on the synthetic suite: ``python -m tokengine.train``.

Staged, as DESIGN.md's CPU lessons ask (a from-scratch end-to-end run learned only colour),
one module of :mod:`tokengine.training` each:

a. dense vision pre-training of the ViT (``--vision-minutes``; :mod:`tokengine.training.vision`);
b. a cache of the frozen ViT's grids (``--cache-samples``; :mod:`tokengine.training.cache`);
c. reducer + projector + LM on the cached grids, N_l drawn per batch (``--minutes`` or
   ``--steps``; :mod:`tokengine.training.stage_c`).

``--eval-test`` then scores the saved model on the fixed test split with the Engine
(:mod:`tokengine.training.scoring`) and every run writes MODEL_CARD.md
(:mod:`tokengine.training.card`). On the CPU, a run with ``--steps``, ``--vision-steps`` and a
fixed ``--threads`` is deterministic (a resumed run ends with the same weights as an
uninterrupted one); ``--minutes`` budgets and GPU runs are not.

On this repository's 2-core CPU (torch 2.13, nothing else running), stages a + b take 24 min
(20 min of dense vision training, then 40,000 cached grids; shared by both variants; stage c
here is a token 3 s)::

    python -m tokengine.train --variant fusion --output runs/stage-ab \\
        --cache runs/tiny-cache --vision-minutes 20 --cache-samples 40000 --minutes 0.05 \\
        --val-every 1 --seed 0

then each variant 30 min, one thread each, two runs side by side on the 2 cores (28 min of
stage c, then the test split)::

    python -m tokengine.train --variant fusion --output runs/tiny \\
        --cache runs/tiny-cache --tokens 1,1,4,4,16,16,64,64,144,256,576 --minutes 28 \\
        --val-every 5 --threads 1 --seed 0 --eval-test

That recipe scored 0.48-0.56 on the test split. The shipped checkpoints come from the same code
on a GPU (``--device cuda --workers 6``: 3.3 times the stage-a images and 4.6 times the stage-c
samples in 11 minutes), by ``bench/gpu_train.sh`` and ``bench/gpu_continue.sh``, and
tokengine-tiny from six more continuations (``--init``), five on the CPU and one on the GPU, the
last five drawing the families it had not learned more often (``--family-weights``); their model
cards give the commands. ``--test-only`` scores such a model on the test split afterwards.
``--vision-from DIR`` takes only DIR's ViT (no stage a) and trains the rest from the seed's
initialisation: stage-c recipes compared on one ViT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tokengine.models import VLM
from tokengine.models.tiny import random_tiny
from tokengine.training.cache import build_cache
from tokengine.training.card import write_card
from tokengine.training.common import LOG_FILE, STATE_FILE
from tokengine.training.scoring import score_test
from tokengine.training.stage_c import parse_family_weights, parse_tokens, train_lm
from tokengine.training.vision import train_vision
from tokengine.validation import add_device_argument


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tokengine.train", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--variant",
        choices=("fusion", "fusion-noq"),
        default="fusion",
        help="reducer to train: fusion (question-conditioned) or fusion-noq (the question "
        "withheld, the paper's ablation); default %(default)s",
    )
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument(
        "--cache",
        default=None,
        help="feature cache dir (default: .cache-NAME beside OUTPUT, NAME its last part)",
    )
    p.add_argument(
        "--minutes", type=float, default=15.0, help="stage c time budget; default %(default)s"
    )
    p.add_argument("--steps", type=int, default=0, help="stage c steps (overrides --minutes)")
    p.add_argument(
        "--vision-minutes",
        type=float,
        default=7.0,
        help="stage a (dense ViT pre-training) time budget; default %(default)s",
    )
    p.add_argument("--vision-steps", type=int, default=0, help="overrides --vision-minutes")
    p.add_argument(
        "--vision-batch-size",
        type=int,
        default=32,
        help="stage a images per step; default %(default)s",
    )
    p.add_argument(
        "--cache-samples",
        type=int,
        default=30000,
        help="training samples whose ViT grids stage b caches; default %(default)s",
    )
    p.add_argument(
        "--val-samples",
        type=int,
        default=512,
        help="cached validation samples (validation stream); default %(default)s",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="stage c samples per step at N_l <= 64 (fewer above: about the same LM tokens "
        "per step); default %(default)s",
    )
    p.add_argument(
        "--min-batch",
        type=int,
        default=0,
        help="batch floor for large N_l (default 0: --batch-size / 8)",
    )
    p.add_argument(
        "--lr", type=float, default=2e-3, help="stage c peak AdamW rate; default %(default)s"
    )
    p.add_argument(
        "--vision-lr", type=float, default=3e-3, help="stage a rate; default %(default)s"
    )
    p.add_argument(
        "--warmup", type=int, default=100, help="stage c linear warm-up steps; default %(default)s"
    )
    p.add_argument(
        "--decay-start",
        type=float,
        default=0.0,
        help="share of stage c run at the full learning rate before its cosine decay; "
        "default %(default)s",
    )
    p.add_argument(
        "--pool-share",
        type=float,
        default=0.25,
        help="share of stage c batches whose tokens are grid-pooled ViT tokens instead of the "
        "reducer's; default %(default)s",
    )
    p.add_argument(
        "--family-weights",
        default=None,
        help="stage c: how often each family's cached samples are drawn, e.g. "
        "counting=2,spatial=2 (families not named: 1)",
    )
    p.add_argument(
        "--probe-weight",
        type=float,
        default=1.0,
        help="weight of the training-only answer probe on the reduced tokens; default %(default)s",
    )
    p.add_argument(
        "--attend-weight",
        type=float,
        default=0.0,
        help="weight of a loss asking the last fusion block's cross-attention to put its image "
        "mass on the asked character's patches, on text questions (the cache's records must "
        "name them: caches built since 2026-11-28 do); default %(default)s",
    )
    p.add_argument(
        "--select-image",
        action="store_true",
        help="a new reducer whose output tokens are question-chosen mixes of image tokens, "
        "not the queries' states (see FusionConfig.select_image); not with --init",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument(
        "--val-every",
        type=float,
        default=4.0,
        help="minutes between validations; default %(default)s",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=200,
        help="steps between state saves, in stage a and in stage c (0: none); default %(default)s",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run: stage a from the state saved in --cache (or, once it has "
        "ended, from stage b), stage c from OUTPUT/train_state.pt",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--init",
        default=None,
        help="continue this model directory in stage c, as saved (its reducer's shape too)",
    )
    start.add_argument(
        "--vision-from",
        default=None,
        help="take only the ViT of this model directory (no stage a) and train the rest from "
        "the seed's initialisation: stage-c recipes compared on one ViT",
    )
    p.add_argument(
        "--tokens",
        default=None,
        help="comma list of N_l to sample from uniformly (repeat a value to weight it); "
        "default 1,4,16,64,144,256,576",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads; default %(default)s")
    add_device_argument(p, default="cpu")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes making stage a's and b's images (0: the training process itself)",
    )
    p.add_argument("--eval-test", action="store_true", help="score the test split at N_l 576, 1")
    p.add_argument(
        "--test-per-family",
        type=int,
        default=200,
        help="test questions per family for --eval-test and --test-only; default %(default)s",
    )
    p.add_argument(
        "--test-only",
        action="store_true",
        help="train nothing: score the model saved in OUTPUT (trained elsewhere, on a GPU say) on "
        "the test split and rewrite its training.json and MODEL_CARD.md",
    )
    args = p.parse_args(argv)
    if not 0 <= args.decay_start < 1:
        p.error(f"--decay-start must be in [0, 1), got {args.decay_start}")
    if args.attend_weight and args.variant != "fusion":
        p.error("--attend-weight needs --variant fusion (without the question, the reducer "
                "cannot know which character is asked)")  # fmt: skip
    if args.select_image and args.init:
        p.error("--select-image: a model given by --init keeps its own reducer")
    for flag, path in (("--init", args.init), ("--vision-from", args.vision_from)):
        if path and not (Path(path) / "config.json").is_file():
            p.error(f"{flag} {path} is not a model directory (no config.json)")
    if not 0 <= args.pool_share <= 1:
        p.error(f"--pool-share must be in [0, 1], got {args.pool_share}")
    at_least = {  # flag: the smallest value that means something
        "minutes": 0, "steps": 0, "vision_minutes": 0, "vision_steps": 0, "min_batch": 0,
        "probe_weight": 0, "attend_weight": 0, "val_every": 0, "save_every": 0, "workers": 0,
        "vision_batch_size": 1, "cache_samples": 1, "val_samples": 1, "batch_size": 1,
        "warmup": 1, "threads": 1, "test_per_family": 1,
    }  # fmt: skip
    for name, least in at_least.items():
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    for name in ("lr", "vision_lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    # a time budget of 0 is no budget (it used to divide by zero); stage a's is checked only
    # where stage a runs (a continued model, a lent ViT or a cache already built skip it)
    if not args.steps and not args.minutes > 0:
        p.error(f"--minutes must be > 0 when --steps is not given, got {args.minutes}")
    try:
        args.family_weights = parse_family_weights(args.family_weights)
        parse_tokens(args.tokens, args.pool_share > 0)
    except ValueError as exc:
        p.error(str(exc))
    return args


def command_line(argv: list[str] | None) -> list[str]:
    """This run's command as typed (under ``-m`` Python puts the module's path in argv[0])."""
    return ["python -m tokengine.train", *(sys.argv[1:] if argv is None else argv)]


def describe_device(device: str) -> str:
    """The accelerator's name (``NVIDIA H100 80GB HBM3``), or "the CPU"."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the CPU"


def init_stage_a(init: Path) -> dict:
    """Stage a's record from the training.json of the model at ``init``: its ViT is kept."""
    record = init / LOG_FILE
    if not record.is_file():
        raise SystemExit(f"{init}: no {LOG_FILE} there to say how its ViT was trained")
    return json.loads(record.read_text())["cache"]["stage_a"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        tqdm.write(f"[{time.perf_counter() - t0:7.0f} s] {msg}", file=sys.stdout)

    if args.test_only:
        if not (out / LOG_FILE).is_file():
            raise SystemExit(f"--test-only: {out / LOG_FILE} not found (train a model there first)")
        summary = json.loads((out / LOG_FILE).read_text())
        summary["test_per_family"] = args.test_per_family
        summary["test"] = score_test(out, summary["variant"], args.test_per_family, log)
        summary["test_argv"] = command_line(argv)
        write_card(out, summary, VLM.from_pretrained(out))
        log(f"done: {out}")
        return summary
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out.parent / f".cache-{out.name}"

    if args.init:  # continue a saved model as it is, its reducer's shape included
        vlm = VLM.from_pretrained(args.init).to(args.device)  # (fresh optimiser and schedule)
        log(f"initialised from {args.init}")
    else:
        vlm = random_tiny(args.seed, select_image=args.select_image).to(args.device)
    if args.vision_from:  # its ViT; the reducer, projector and LM as initialised above
        vlm.vision.load_state_dict(VLM.from_pretrained(args.vision_from).vision.state_dict())
        log(f"ViT from {args.vision_from}")
    vision_source = args.init or args.vision_from
    # stage c starts from this RNG state whether or not stages a and b run in this process
    stage_c_rng = torch.get_rng_state()
    if not (cache / "meta.json").is_file():
        # a model to continue (or lend its ViT) brings that ViT: cache the grids it makes
        stage_a = (
            init_stage_a(Path(vision_source))
            if vision_source
            else train_vision(vlm, args, log, cache)
        )
        build_cache(vlm, args, cache, stage_a, log)
    else:
        log(f"reusing the feature cache {cache}")
    meta = json.loads((cache / "meta.json").read_text())
    cached_vit = torch.load(cache / "vision.pt", map_location=args.device)
    # stage c trains on the cache's grids, so its ViT is the one saved; a model given for its
    # ViT must be the one that made them, or it would be swapped silently
    if vision_source and any(
        not torch.equal(cached_vit[k], v) for k, v in vlm.vision.state_dict().items()
    ):
        raise SystemExit(
            f"--cache {cache} holds grids made by another ViT than {vision_source}'s: give a new "
            "--cache (it is then built with that ViT) or the one made with it"
        )
    vlm.vision.load_state_dict(cached_vit)
    torch.set_rng_state(stage_c_rng)
    stage_c = train_lm(vlm, args, cache, out, log)
    vlm.eval().cpu()
    vlm.save_pretrained(out)
    summary = {"argv": command_line(argv),
               "output": str(out), "variant": args.variant, "seed": args.seed, "cache": meta,
               "stage_c": stage_c, "test_per_family": args.test_per_family,
               "device": describe_device(args.device)}  # fmt: skip
    if args.eval_test:
        summary["test"] = score_test(out, args.variant, args.test_per_family, log)
    summary["wall_seconds_this_run"] = time.perf_counter() - t0
    write_card(out, summary, vlm)
    (out / STATE_FILE).unlink(missing_ok=True)
    log(f"done: {out}")
    return summary


if __name__ == "__main__":
    main()
