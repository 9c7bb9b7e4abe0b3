"""Stage a again on a trained ViT: does its per-patch character reading keep improving with more
images (V1: ViT and fresh heads trained), beside the same heads trained on the frozen ViT (V0)?
And, from scratch, does a wider ViT read characters better after the same images?

    python bench/results/cpu-stage-a-2026-11-28/more_stage_a.py OUT --steps S [--frozen]
        [--scratch-width W] [--model tokengine-tiny] [--seed 5] [--batch-size 128]
        [--lr 3e-3] [--threads 2]

Runs ``tokengine.training.vision.train_vision`` (stage a as ``python -m tokengine.train`` runs
it: the same heads, losses, learning-rate schedule and held-out patch accuracy) from the
model's ViT for S steps. With ``--frozen`` only the heads learn. With ``--scratch-width W`` the
ViT is new instead: tokengine-tiny's shape (3 layers, 4 heads) but W wide with a 4W-wide MLP,
from random weights, in a random tokengine-tiny whose reducer and projector take W-wide tokens.
Writes OUT/stage_a.json and, when the ViT learned, OUT/model: the model with that ViT (the rest
is the model's own or random, so only its ViT grid is meaningful, e.g. for
``bench/text_reading.py``'s probes).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from tokengine.models import VLM, tiny
from tokengine.models.reducer import FusionReducer
from tokengine.training.vision import train_vision


def scratch_model(width: int) -> VLM:
    """A random tokengine-tiny whose ViT (and so its reducer and projector input) is ``width``
    wide, with a ``4 * width`` MLP."""
    tokenizer = tiny.build_tokenizer()
    config = tiny.tiny_config(tokenizer.get_vocab_size())
    config.vision = replace(config.vision, hidden_size=width, intermediate_size=4 * width)
    vlm = VLM(config)
    vlm.reducer = FusionReducer(replace(tiny.tiny_fusion_config(), vision_dim=width))
    vlm.tokenizer = tokenizer
    return vlm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--frozen", action="store_true", help="train the heads alone")
    p.add_argument("--scratch-width", type=int, default=0, help="a new ViT this wide")
    p.add_argument("--model", default="tokengine-tiny")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="train's --vision-lr default")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.frozen and args.scratch_width:
        p.error("--frozen keeps a trained ViT; it cannot go with --scratch-width")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the heads' initialisation (and a new ViT's)
    if args.scratch_width:
        vlm = scratch_model(args.scratch_width)
    elif args.model in tiny.available_models():
        vlm = VLM.from_pretrained(tiny.shipped_path(args.model))
    else:
        vlm = VLM.from_pretrained(args.model)
    if args.frozen:
        vlm.vision.requires_grad_(False)  # AdamW skips parameters without a gradient
    run = SimpleNamespace(vision_steps=args.steps, vision_minutes=0, vision_lr=args.lr,
                          vision_batch_size=args.batch_size, seed=args.seed, workers=0,
                          val_every=1)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    res = train_vision(vlm, run, print)
    summary = {"argv": vars(args) | {"out": str(args.out)}, "stage_a": res}
    (args.out / "stage_a.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not args.frozen:
        vlm.save_pretrained(args.out / "model")


if __name__ == "__main__":
    main()
