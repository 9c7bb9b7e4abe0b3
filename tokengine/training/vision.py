"""Stage a of training tokengine-tiny: dense vision pre-training (``--vision-minutes``).

The CLIP ViT learns per-patch labels from :func:`tokengine.data.synthetic.dense_labels` (colour,
shape, character, object centre; background is a class of its own) through LayerNorm + linear
heads on its last layer, plus each object's shape from its patches' mean feature (per-patch
shape labels alone stayed at chance).
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tokengine.data.synthetic import CHARSET, COLOUR_NAMES, GRID, SHAPES, dense_labels, train_stream
from tokengine.models import VLM
from tokengine.models.preprocess import preprocess_images
from tokengine.models.tiny import IMAGE_SIZE
from tokengine.training.common import (
    VAL_STREAM_OFFSET,
    model_device,
    optimizer_step,
    segment_mean,
    stream_batches,
)

# in the cache directory, so that a killed run's --resume finds them before the cache is built
STAGE_A_STATE = "stage_a_state.pt"  # stage a's resume state, every --save-every steps
STAGE_A_DONE = "stage_a.json"  # stage a's result, written with the ViT it trained (vision.pt)


class DenseHeads(nn.Module):
    """Per-patch linear heads (after LayerNorm) on the ViT's output grid, plus a shape head on
    each object's mean patch feature.

    A patch inside a shape looks the same for every shape, so per-patch shape labels alone
    left the ViT at chance (0.23 after 300 steps, measured); the object-mean head only asks
    that the patches' features *sum* to the shape, which boundary patches can each add to.
    """

    SIZES = {"colour": len(COLOUR_NAMES) + 1, "shape": len(SHAPES) + 1,
             "char": len(CHARSET) + 1, "centre": 2}  # fmt: skip

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in self.SIZES.items()})
        self.object_norm = nn.LayerNorm(dim)
        self.object_shape = nn.Linear(dim, len(SHAPES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(x)
        return {k: head(h) for k, head in self.heads.items()}

    def object_logits(self, x: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
        """Shape logits (count, len(SHAPES)) of the mean of ``x`` (B, N, D) over each segment;
        ``segments`` (B, N) holds a segment index per patch, -1 for none."""
        flat, seg = x.flatten(0, 1), segments.flatten()
        keep = seg >= 0
        return self.object_shape(self.object_norm(segment_mean(flat[keep], seg[keep], count)))


def object_targets(samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch, the index of its shape object over the batch (-1: none), (B, 576); and each
    such object's shape, (count,)."""
    segments = np.full((len(samples), GRID * GRID), -1, dtype=np.int64)
    shapes: list[int] = []
    for b, sample in enumerate(samples):
        lab = dense_labels(sample)
        ids, shape = lab["object"].reshape(-1), lab["shape"].reshape(-1)
        for i in np.unique(ids[shape >= 0]):
            at = ids == i
            segments[b, at] = len(shapes)
            shapes.append(int(shape[at][0]))
    return torch.from_numpy(segments), torch.tensor(shapes, dtype=torch.long)


def patch_targets(sample) -> dict[str, np.ndarray]:
    """(576,) int64 targets per head; -1 (no label) becomes the background class (last)."""
    lab = dense_labels(sample)
    out = {}
    for key in ("colour", "shape", "char"):
        n = DenseHeads.SIZES[key] - 1
        a = lab[key].astype(np.int64)
        out[key] = np.where(a < 0, n, a).reshape(-1)
    ids = lab["object"]
    centre = np.zeros((GRID, GRID), dtype=np.int64)
    for i in np.unique(ids):
        if i <= 0:
            continue
        r, c = np.nonzero(ids == i)
        centre[int(round(r.mean())), int(round(c.mean()))] = 1
    out["centre"] = centre.reshape(-1)
    return out


def dense_batch(samples, processor) -> tuple:
    """Stage a's inputs: pixels (B, 3, H, W), per-patch targets {head: (B, 576)}, and the
    object segments (B, 576) with each object's shape."""
    pixels = preprocess_images([s.image for s in samples], processor)
    tg = [patch_targets(s) for s in samples]
    targets = {k: torch.from_numpy(np.stack([t[k] for t in tg])) for k in tg[0]}
    return (pixels, targets, *object_targets(samples))


@torch.no_grad()
def patch_accuracy(vlm: VLM, heads: DenseHeads, samples) -> dict[str, float]:
    """Per-head accuracy on the object patches of held-out scenes (centre: on centre patches)."""
    was_training = vlm.vision.training
    vlm.vision.eval()
    pixels, targets, segments, shapes = dense_batch(samples, vlm.image_processor)
    dev = model_device(vlm)
    feats = vlm.vision(pixels.to(dev))
    vlm.vision.train(was_training)
    out = heads(feats)
    acc = {}
    for k in out:
        t = targets[k].to(dev)
        fg = t != (DenseHeads.SIZES[k] - 1) if k != "centre" else t == 1
        acc[k] = round(float((out[k].argmax(-1) == t)[fg].float().mean()), 3)
    shapes = shapes.to(dev)
    hit = heads.object_logits(feats, segments.to(dev), len(shapes)).argmax(-1) == shapes
    acc["object_shape"] = round(float(hit.float().mean()), 3)
    return acc


def train_vision(vlm: VLM, args, log, cache: Path) -> dict:
    """Stage a: dense supervision of the vision tower, for a time or step budget.

    Its state is saved under ``cache`` every ``--save-every`` steps and its ViT when it ends,
    before stage b, so ``--resume`` continues a killed run from the last save (the same weights
    as an uninterrupted run) or, once stage a has ended, from stage b.
    """
    if not args.vision_steps and not args.vision_minutes > 0:
        raise SystemExit(
            f"--vision-minutes must be > 0 when --vision-steps is not given (stage a runs: no "
            f"--init, no --vision-from and no feature cache yet), got {args.vision_minutes}"
        )
    dev = model_device(vlm)
    cache.mkdir(parents=True, exist_ok=True)
    done_file, state_file = cache / STAGE_A_DONE, cache / STAGE_A_STATE
    settings = {"seed": args.seed, "vision_batch_size": args.vision_batch_size,
                "vision_steps": args.vision_steps, "vision_minutes": args.vision_minutes,
                "vision_lr": args.vision_lr}  # fmt: skip
    if args.resume and done_file.is_file():
        res = json.loads(done_file.read_text())
        _check_settings(res.pop("settings"), settings, done_file)
        vlm.vision.load_state_dict(torch.load(cache / "vision.pt", map_location=dev))
        log(f"stage a: ended before, its ViT reused ({done_file})")
        return res
    heads = DenseHeads(vlm.config.vision.hidden_size).to(dev)
    params = list(vlm.vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01)
    step, spent, hist = 0, 0.0, []
    if args.resume and state_file.is_file():
        st = torch.load(state_file, map_location=dev, weights_only=False)
        _check_settings(st["settings"], settings, state_file)
        vlm.vision.load_state_dict(st["vision"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["optim"])
        step, spent, hist = st["step"], st["spent"], st["hist"]
        log(f"stage a: resumed at step {step} ({spent:.0f} s spent)")
    budget = args.vision_minutes * 60
    # background (the last class) is most patches: weigh it down so objects are learned
    weights = {k: torch.ones(n) for k, n in DenseHeads.SIZES.items()}
    for k in ("colour", "shape", "char"):
        weights[k][-1] = 0.2
    weights["centre"][1] = 5.0
    weights = {k: w.to(dev) for k, w in weights.items()}
    prepare = partial(dense_batch, processor=vlm.image_processor)
    batches = stream_batches(args.seed, step * args.vision_batch_size, 2**62,
                             args.vision_batch_size, prepare, args.workers)  # fmt: skip
    val = list(islice(train_stream(args.seed + VAL_STREAM_OFFSET, IMAGE_SIZE), 256))
    vlm.vision.train()
    t0 = time.perf_counter() - spent
    bar = tqdm(desc="a: dense vision", unit="step", file=sys.stdout, mininterval=5, initial=step)
    for pixels, targets, segments, shapes in batches:
        elapsed = time.perf_counter() - t0
        frac = step / args.vision_steps if args.vision_steps else elapsed / budget
        if frac >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = args.vision_lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - frac))
        targets = {k: t.to(dev) for k, t in targets.items()}
        segments, shapes = segments.to(dev), shapes.to(dev)
        feats = vlm.vision(pixels.to(dev))
        out = heads(feats)
        losses = {
            k: F.cross_entropy(
                out[k].flatten(0, 1),
                targets[k].flatten(),
                weight=weights[k],
            )
            for k in out
        }
        losses["object_shape"] = F.cross_entropy(
            heads.object_logits(feats, segments, len(shapes)), shapes
        )
        hist.append(optimizer_step(opt, params, sum(losses.values())))
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{np.mean(hist[-20:]):.3f}")
        if args.val_every and step % 100 == 0:
            log(f"  step {step} loss {np.mean(hist[-20:]):.3f} patch accuracy "
                f"{patch_accuracy(vlm, heads, val[:64])}")  # fmt: skip
        if args.save_every and step % args.save_every == 0:
            state = {"vision": vlm.vision.state_dict(), "heads": heads.state_dict(),
                     "optim": opt.state_dict(), "step": step, "hist": hist,
                     "spent": time.perf_counter() - t0, "settings": settings}  # fmt: skip
            torch.save(state, state_file.with_suffix(".tmp"))
            state_file.with_suffix(".tmp").replace(state_file)  # a kill mid-save keeps the last
    bar.close()
    acc = patch_accuracy(vlm, heads, val)
    res = {"steps": step, "seconds": time.perf_counter() - t0, "final_loss": hist[-1] if hist else
           None, "patch_accuracy_fg": acc, "images": step * args.vision_batch_size}  # fmt: skip
    log(f"stage a: {res}")
    torch.save({k: v.cpu() for k, v in vlm.vision.state_dict().items()}, cache / "vision.pt")
    done_file.write_text(json.dumps({**res, "settings": settings}, indent=2))
    state_file.unlink(missing_ok=True)
    return res


def _check_settings(saved: dict, given: dict, path: Path) -> None:
    """A resumed stage a must be the one saved: the same seed, batch and budget."""
    changed = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
    if changed:
        raise SystemExit(
            f"--resume: {path} was saved by a stage a with other settings (saved, given): "
            f"{changed}; give those or a new --cache"
        )
