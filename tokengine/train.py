"""Train tokengine-tiny on the synthetic suite: ``python -m tokengine.train``.

Staged, as DESIGN.md's CPU lessons ask (a from-scratch end-to-end run learned only colour):

a. **Dense vision pre-training** (``--vision-minutes``): the CLIP ViT learns per-patch labels
   from :func:`tokengine.data.synthetic.dense_labels` (colour, shape, character, object centre;
   background is a class of its own) through LayerNorm + linear heads on its last layer, plus
   each object's shape from its patches' mean feature (per-patch shape labels alone stayed at
   chance).
b. **Feature cache** (``--cache-samples``): the frozen ViT's 24×24×64 grids of that many
   training-stream samples, fp16 in a ``.npy`` memmap under ``--cache`` with the prompts'
   token ids. Both variants reuse one cache (the second run finds it and skips a and b).
c. **Reducer + projector + LM** (``--minutes`` or ``--steps``) on the cached grids: each batch
   draws N_l uniformly from {1, 4, 16, 64, 144, 256, 576} (log-uniform over the sweep's points)
   and goes through the fusion reducer — with the question (``--variant fusion``) or without
   (``fusion-noq``, the paper's ablation) — or, for a ``--pool-share`` of batches (25%),
   through ``pool-avg``, so that the sweep's pooling baseline is meaningful on the same
   checkpoint. The prompt is the Engine's (``USER: <image>\\n{question} ASSISTANT:``, ``<s>``
   first, ``<image>`` expanded to N_l slots, left-padded); the loss is cross-entropy on the
   answer token and EOS, plus (weight ``--probe-weight``) a training-only linear probe that
   reads the answer off the mean reduced token and the mean question embedding, a short
   gradient path into the reducer (:class:`AnswerProbe`; not saved).

Validation runs on a held-out slice of the training stream (another stream seed, never the
test split); ``--eval-test`` then scores the saved model on the fixed test split with the
Engine. State is saved every ``--save-every`` steps; ``--resume`` continues from it. On the CPU,
a run with ``--steps``, ``--vision-steps`` and a fixed ``--threads`` is deterministic (a resumed
run ends with the same weights as an uninterrupted one); ``--minutes`` budgets and GPU runs are
not.

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

Each writes MODEL_CARD.md with its command, times and validation and test-split scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tokengine.data.synthetic import (
    CHARSET,
    COLOUR_NAMES,
    FAMILIES,
    GRID,
    SHAPES,
    Sample,
    dense_labels,
    normalize_answer,
    test_split,
    train_sample,
    train_stream,
)
from tokengine.engine import LLAVA_TEMPLATE
from tokengine.models import VLM
from tokengine.models.preprocess import preprocess_images
from tokengine.models.reducer import packed_segment_ids, reduce_tokens
from tokengine.models.tiny import EOS_ID, IMAGE_ID, IMAGE_SIZE, PAD_ID, random_tiny
from tokengine.validation import add_device_argument, pool_tokens

TOKENS = (1, 4, 16, 64, 144, 256, 576)
VAL_TOKENS = (1, 16, 144, 576)
VAL_STREAM_OFFSET = 7919  # validation uses train_stream(seed + this): disjoint from training
STATE_FILE = "train_state.pt"
LOG_FILE = "training.json"


# ------------------------------------------------------------------------------ stage a
def model_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters are (training moves the whole model with ``--device``)."""
    return next(module.parameters()).device


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


def segment_mean(rows: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
    """(count, D): the mean of the rows (R, D) with each segment index (R,); zero if none."""
    sums = rows.new_zeros(count, rows.shape[-1]).index_add_(0, segment, rows)
    return sums / torch.bincount(segment, minlength=count).clamp_min(1)[:, None]


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


class StreamBatches(Dataset):
    """Batch ``i``: samples ``start + i * size`` up to (not including) ``stop`` of
    ``train_stream(seed)`` at the model's image size, as ``prepare`` returns them.

    Each batch depends on its index alone, so a DataLoader's workers make them in parallel
    (``--workers``, for a GPU's appetite) and in order: the same batches as one process.
    """

    def __init__(self, seed: int, start: int, stop: int, size: int, prepare: Callable) -> None:
        self.seed, self.start, self.stop, self.size, self.prepare = seed, start, stop, size, prepare

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.size)

    def __getitem__(self, i: int):
        lo = self.start + i * self.size
        hi = min(lo + self.size, self.stop)
        return self.prepare([train_sample(self.seed, k, IMAGE_SIZE) for k in range(lo, hi)])


def stream_batches(seed: int, start: int, stop: int, size: int, prepare: Callable,
                   workers: int) -> DataLoader:  # fmt: skip
    """The batches of :class:`StreamBatches` in order, made by ``workers`` processes (0: here)."""
    data = StreamBatches(seed, start, stop, size, prepare)
    # its own generator: a DataLoader draws a worker seed, which would shift the global RNG
    return DataLoader(data, batch_size=None, num_workers=workers, generator=torch.Generator(),
                      prefetch_factor=4 if workers else None)  # fmt: skip


def dense_batch(samples, processor) -> tuple:
    """Stage a's inputs: pixels (B, 3, H, W), per-patch targets {head: (B, 576)}, and the
    object segments (B, 576) with each object's shape."""
    pixels = preprocess_images([s.image for s in samples], processor)
    tg = [patch_targets(s) for s in samples]
    targets = {k: torch.from_numpy(np.stack([t[k] for t in tg])) for k in tg[0]}
    return (pixels, targets, *object_targets(samples))


def cache_batch(samples, processor) -> tuple:
    """Stage b's inputs: pixels (B, 3, H, W) and the samples without their images."""
    pixels = preprocess_images([s.image for s in samples], processor)
    return pixels, [dataclasses.replace(s, image=None) for s in samples]


def optimizer_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor) -> float:
    """Backward, clip the gradient norm to 1 and step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


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


def train_vision(vlm: VLM, args, log) -> dict:
    """Stage a: dense supervision of the vision tower, for a time or step budget."""
    if not args.vision_steps and not args.vision_minutes > 0:
        raise SystemExit(
            f"--vision-minutes must be > 0 when --vision-steps is not given (stage a runs: no "
            f"--init, no --vision-from and no feature cache yet), got {args.vision_minutes}"
        )
    dev = model_device(vlm)
    heads = DenseHeads(vlm.config.vision.hidden_size).to(dev)
    params = list(vlm.vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01)
    budget = args.vision_minutes * 60
    # background (the last class) is most patches: weigh it down so objects are learned
    weights = {k: torch.ones(n) for k, n in DenseHeads.SIZES.items()}
    for k in ("colour", "shape", "char"):
        weights[k][-1] = 0.2
    weights["centre"][1] = 5.0
    weights = {k: w.to(dev) for k, w in weights.items()}
    prepare = partial(dense_batch, processor=vlm.image_processor)
    batches = stream_batches(args.seed, 0, 2**62, args.vision_batch_size, prepare, args.workers)
    val = list(islice(train_stream(args.seed + VAL_STREAM_OFFSET, IMAGE_SIZE), 256))
    vlm.vision.train()
    t0, step, hist = time.perf_counter(), 0, []
    bar = tqdm(desc="a: dense vision", unit="step", file=sys.stdout, mininterval=5)
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
    bar.close()
    acc = patch_accuracy(vlm, heads, val)
    res = {"steps": step, "seconds": time.perf_counter() - t0, "final_loss": hist[-1] if hist else
           None, "patch_accuracy_fg": acc, "images": step * args.vision_batch_size}  # fmt: skip
    log(f"stage a: {res}")
    return res


# ------------------------------------------------------------------------------ stage b
def _prompt_parts(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """(ids before <image>, ids after it) of the Engine's prompt, <s> included."""
    ids = tokenizer.encode(LLAVA_TEMPLATE.format(question=question)).ids
    at = ids.index(IMAGE_ID)
    return ids[:at], ids[at + 1 :]


def _records(vlm: VLM, samples) -> list[dict]:
    tok = vlm.tokenizer
    recs = []
    for s in samples:
        pre, post = _prompt_parts(tok, s.question)
        ans = tok.encode(s.answer, add_special_tokens=False).ids
        if len(ans) != 1:
            raise ValueError(f"answer {s.answer!r} is not one token")
        recs.append({
            "pre": pre, "post": post, "answer": ans[0], "family": FAMILIES.index(s.family),
            "question": tok.encode(s.question, add_special_tokens=False).ids,
        })  # fmt: skip
    return recs


@torch.inference_mode()
def encode_pixels(vlm: VLM, pixels: torch.Tensor) -> np.ndarray:
    """The frozen ViT's grids (B, 576, Dv), float16 on the host, of pixels (B, 3, H, W)."""
    return vlm.encode_images(pixels.to(model_device(vlm))).to(torch.float16).cpu().numpy()


def encode_samples(vlm: VLM, samples, chunk: int = 128) -> np.ndarray:
    """:func:`encode_pixels` of the samples' images, ``chunk`` at a time."""
    return np.concatenate([
        encode_pixels(vlm, preprocess_images([s.image for s in samples[i : i + chunk]],
                                             vlm.image_processor))
        for i in range(0, len(samples), chunk)
    ])  # fmt: skip


def build_cache(vlm: VLM, args, cache: Path, stage_a: dict, log) -> None:
    """Stage b: frozen-ViT features of ``--cache-samples`` training samples (+ validation)."""
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n, dv = args.cache_samples, vlm.config.vision.hidden_size
    feats = np.lib.format.open_memmap(
        cache / "features.npy", mode="w+", dtype=np.float16, shape=(n, GRID * GRID, dv)
    )
    # stage a used the first samples of the stream; cache fresh ones after them
    skip = stage_a.get("images", 0)
    recs, done = [], 0
    bar = tqdm(total=n, desc="b: cache features", unit="img", file=sys.stdout, mininterval=5)
    prepare = partial(cache_batch, processor=vlm.image_processor)
    for pixels, batch in stream_batches(args.seed, skip, skip + n, 1024, prepare, args.workers):
        feats[done : done + len(batch)] = encode_pixels(vlm, pixels)
        recs += _records(vlm, batch)
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    feats.flush()
    del feats
    val = list(islice(train_stream(args.seed + VAL_STREAM_OFFSET, IMAGE_SIZE), args.val_samples))
    np.save(cache / "val_features.npy", encode_samples(vlm, val))
    (cache / "records.json").write_text(json.dumps(recs))
    (cache / "val_records.json").write_text(json.dumps(_records(vlm, val)))
    torch.save({k: v.cpu() for k, v in vlm.vision.state_dict().items()}, cache / "vision.pt")
    meta = {"samples": n, "seed": args.seed, "stage_a": stage_a,
            "cache_seconds": time.perf_counter() - t0}  # fmt: skip
    (cache / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"stage b: cached {n} samples in {meta['cache_seconds']:.0f} s")


# ------------------------------------------------------------------------------ stage c
class AnswerProbe(nn.Module):
    """Training-only deep supervision: the answer read straight off the reduced tokens.

    Stage c learned slowly through the LM alone (the answer prior only, for thousands of
    steps); a linear readout of the mean reduced token plus the mean question embedding gives
    the reducer a short gradient path to the answer. It is not part of the saved model.
    """

    def __init__(self, vision_dim: int, text_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.question = nn.Linear(text_dim, vision_dim)
        self.norm = nn.LayerNorm(vision_dim)
        self.out = nn.Linear(vision_dim, vocab_size)

    def forward(self, reduced: torch.Tensor, question: torch.Tensor, cu: torch.Tensor):
        """reduced (B, N_l, Dv), question (T, Dt) packed by cu (B+1,) -> logits (B, V)."""
        q = segment_mean(question, packed_segment_ids(cu), len(cu) - 1)
        return self.out(self.norm(reduced.mean(1) + self.question(q)))


def lm_batch(vlm: VLM, feats: torch.Tensor, recs: list[dict], tokens: int, reducer: str,
             probe: AnswerProbe | None = None):  # fmt: skip
    """Logits at the answer and EOS positions: (B, 2, V), and targets (B, 2); with a
    ``probe``, also its answer logits (B, V)."""
    B, dev = len(recs), feats.device
    qlen = torch.tensor([0] + [len(r["question"]) for r in recs])
    cu = qlen.cumsum(0).to(device=dev, dtype=torch.int32)
    flat = torch.tensor([t for r in recs for t in r["question"]], dtype=torch.long, device=dev)
    question = vlm.lm.embed(flat)
    reduced = reduce_tokens(
        reducer, feats, tokens, fusion=vlm.reducer, question=question, cu_seqlens=cu
    )
    image = vlm.project(reduced)  # (B, N_l, Dlm)
    seqs = [r["pre"] + [IMAGE_ID] * tokens + r["post"] + [r["answer"], EOS_ID] for r in recs]
    lens = torch.tensor([len(s) for s in seqs])
    S = int(lens.max())
    ids = torch.full((B, S), PAD_ID, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    ids = ids.to(dev)
    embeds = vlm.lm.embed(ids)
    is_image = (ids == IMAGE_ID)[..., None]
    embeds = embeds.masked_scatter(is_image, image.to(embeds.dtype))
    logits = causal_lm(vlm.lm, embeds)
    rows = torch.arange(B, device=dev)[:, None]
    cols = ((lens - 3)[:, None] + torch.arange(2)).to(dev)
    targets = torch.tensor([[r["answer"], EOS_ID] for r in recs], device=dev)
    if probe is not None:
        return logits[rows, cols], targets, probe(reduced, question, cu)
    return logits[rows, cols], targets


def causal_lm(lm, embeds: torch.Tensor) -> torch.Tensor:
    """The decoder's logits for right-padded rows, (B, S, V), with causal flash attention.

    The same math as ``LlamaDecoder.forward`` with left padding and RoPE positions counted from
    each row's first real token (what the Engine does); right padding makes the plain causal
    mask exact for the real tokens, so training needs neither a KV cache nor a dense mask.
    """
    from tokengine.models.lm import apply_rope, rope_cos_sin, rope_inv_freq

    B, S, _ = embeds.shape
    if lm.inv_freq is None:
        lm.inv_freq = rope_inv_freq(lm.config, embeds.device)
    positions = torch.arange(S, device=embeds.device).expand(B, S)
    cos, sin = rope_cos_sin(lm.inv_freq, positions, embeds.dtype)
    x = embeds
    for layer in lm.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(B, S, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(B, S, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(B, S, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if a.num_kv_heads != a.num_heads:
            rep = a.num_heads // a.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, S, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = lm.norm(x)
    return F.linear(x, lm.embed_tokens.weight) if lm.lm_head is None else lm.lm_head(x)


def validate(vlm: VLM, feats, recs, variant: str, tokens=VAL_TOKENS, pool=True) -> dict:
    """Greedy first-token accuracy per family on cached validation features."""
    vlm.eval()
    out = {}
    runs = [(variant, n) for n in tokens] + ([("pool-avg", 576), ("pool-avg", 16)] if pool else [])
    with torch.no_grad():
        for reducer, n in runs:
            hits = defaultdict(list)
            for i in range(0, len(recs), 128):
                r = recs[i : i + 128]
                f = feats[i : i + 128].float()
                logits, tg = lm_batch(vlm, f, r, n, reducer)
                ok = (logits[:, 0].argmax(-1) == tg[:, 0]).tolist()
                for x, rec in zip(ok, r, strict=True):
                    hits[FAMILIES[rec["family"]]].append(x)
            fam = {f: float(np.mean(hits[f])) for f in FAMILIES if hits[f]}
            fam["mean"] = float(np.mean(list(fam.values())))
            out[f"{reducer}@{n}"] = fam
    vlm.train()
    return out


def _fmt(scores: dict) -> str:
    return " ".join(f"{k}={v['mean']:.3f}" for k, v in scores.items())


def stage_c_lr(peak: float, step: int, frac: float, warmup: int, decay_start: float) -> float:
    """Learning rate at ``step`` (``frac`` of stage c done): linear warm-up over ``warmup``
    steps, the peak until ``decay_start``, then a cosine down to 5% of it at the end."""
    warm = min(1.0, (step + 1) / warmup)
    decay = max(0.0, frac - decay_start) / (1 - decay_start)
    return peak * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * decay)))


def load_features(path: Path, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """A cached ``.npy`` of grids (N, 576, Dv) float16, on ``device``, read a chunk at a time
    (no second host copy of a cache of many GiB)."""
    src = np.load(path, mmap_mode="r")
    out = torch.empty(src.shape, dtype=torch.float16, device=device)
    for i in range(0, len(src), chunk):
        out[i : i + chunk] = torch.from_numpy(np.array(src[i : i + chunk]))
    return out


def parse_tokens(text: str | None, pool: bool) -> list[int]:
    """``"1,1,4,576"`` -> the N_l that stage c draws from (default: :data:`TOKENS`); each must
    be in 1..576 and, when some batches are pooled (``pool``), reachable by grid pooling."""
    if not text:
        return list(TOKENS)
    try:
        tokens = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--tokens: expected comma-separated integers, got {text!r}") from None
    for t in tokens:
        if not 1 <= t <= GRID * GRID:
            raise ValueError(f"--tokens: each N_l must be in 1..{GRID * GRID}, got {t}")
        if pool:
            try:
                pool_tokens(t, (GRID, GRID), "avg", GRID * GRID)
            except ValueError as exc:
                msg = f"--tokens (pooled in --pool-share of the batches): {exc}"
                raise ValueError(msg) from None
    return tokens


def parse_family_weights(text: str | None) -> dict[str, int]:
    """``"counting=2,text=3"`` -> a weight for every family (1 where not named)."""
    weights = dict.fromkeys(FAMILIES, 1)
    for item in filter(None, (text or "").split(",")):
        family, _, value = item.partition("=")
        if family not in weights or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"--family-weights: expected FAMILY=N with FAMILY one of {FAMILIES} and N a "
                f"positive integer, got {item!r}"
            )
        weights[family] = int(value)
    return weights


def weighted_order(recs: list[dict], weights: dict[str, int]) -> list[int]:
    """Indices of the cached samples, a family of weight w w times over: the cache in order,
    then again the samples of the families of weight >= 2, and so on (the first pass is in
    stream order, later ones are shuffled; all weights 1 give the cache once, in order)."""
    passes = range(max(weights.values()))
    return [i for k in passes for i, r in enumerate(recs) if weights[FAMILIES[r["family"]]] > k]


def train_lm(vlm: VLM, args, cache: Path, out: Path, log) -> dict:
    dev = model_device(vlm)
    feats = load_features(cache / "features.npy", dev)
    recs = json.loads((cache / "records.json").read_text())
    val_feats = load_features(cache / "val_features.npy", dev)
    val_recs = json.loads((cache / "val_records.json").read_text())
    n = len(recs)
    log(f"stage c: {n} cached samples, variant {args.variant}, on {dev}")
    vlm.vision.requires_grad_(False)
    c = vlm.config
    probe = AnswerProbe(c.vision.hidden_size, c.text.hidden_size, c.text.vocab_size).to(dev)
    params = [p for name, p in vlm.named_parameters() if not name.startswith("vision.")]
    params += list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(args.seed)
    state_file = out / STATE_FILE
    step, spent, hist, val_log, cursor, seen = 0, 0.0, [], [], 0, 0
    perm = weighted_order(recs, args.family_weights)
    if args.resume and state_file.is_file():
        st = torch.load(state_file, weights_only=False)
        vlm.load_state_dict(st["model"])
        probe.load_state_dict(st["probe"])
        opt.load_state_dict(st["optim"])
        step, spent, hist, val_log = st["step"], st["spent"], st["hist"], st["val_log"]
        cursor, seen, perm = st["cursor"], st["seen"], st["perm"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed at step {step} ({spent:.0f} s spent)")
    elif args.resume:
        log(f"--resume: no {STATE_FILE} in {out} yet, so stage c starts at step 0")
    budget = args.minutes * 60
    token_choices = parse_tokens(args.tokens, args.pool_share > 0)
    min_batch = args.min_batch or max(1, args.batch_size // 8)
    bar = tqdm(desc=f"c: {args.variant}", unit="step", file=sys.stdout, mininterval=5)
    bar.update(step)
    vlm.train()
    t_start = time.perf_counter() - spent
    last_val = spent
    while True:
        spent = time.perf_counter() - t_start
        frac = step / args.steps if args.steps else spent / budget
        if frac >= 1:
            break
        lr = stage_c_lr(args.lr, step, frac, args.warmup, args.decay_start)
        for g in opt.param_groups:
            g["lr"] = lr
        tokens = rng.choice(token_choices)
        # fewer samples for long prompts: about the same LM tokens per step
        bs = max(min_batch, min(args.batch_size, args.batch_size * 64 // tokens))
        if cursor + bs > len(perm):
            rng.shuffle(perm)
            cursor = 0
        idx = perm[cursor : cursor + bs]
        cursor += bs
        seen += bs
        reducer = "pool-avg" if rng.random() < args.pool_share else args.variant
        batch = [recs[i] for i in idx]
        logits, targets, probed = lm_batch(vlm, feats[idx].float(), batch, tokens, reducer, probe)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if reducer != "pool-avg":
            loss = loss + args.probe_weight * F.cross_entropy(probed, targets[:, 0])
        hist.append(optimizer_step(opt, params, loss))
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{np.mean(hist[-50:]):.3f}", lr=f"{lr:.1e}")
        spent = time.perf_counter() - t_start
        if args.val_every and spent - last_val >= args.val_every * 60:
            last_val = spent
            v = validate(
                vlm, val_feats[:256], val_recs[:256], args.variant, tokens=(1, 576), pool=False
            )
            val_log.append({"step": step, "seconds": spent, **v})
            log(f"  step {step} ({spent:.0f} s) loss {np.mean(hist[-50:]):.3f} val {_fmt(v)}")
        if args.save_every and step % args.save_every == 0:
            extra = {"cursor": cursor, "seen": seen, "perm": perm, "probe": probe.state_dict()}
            _save_state(state_file, vlm, opt, step, spent, hist, val_log, rng, extra)
    bar.close()
    final = validate(vlm, val_feats, val_recs, args.variant)
    log(f"final val: {_fmt(final)}")
    return {"steps": step, "seconds": spent, "samples_seen": seen,
            "loss_first": hist[:20], "loss_last": hist[-20:], "val_log": val_log,
            "val_final": final}  # fmt: skip


def _save_state(path, vlm, opt, step, spent, hist, val_log, rng, extra) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": vlm.state_dict(), "optim": opt.state_dict(), "step": step,
                "spent": spent, "hist": hist, "val_log": val_log, "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), **extra}, tmp)  # fmt: skip
    tmp.replace(path)


# ------------------------------------------------------------------------------ test, validation
def validation_split(family: str, n_per_family: int, seed: int = 0) -> list[Sample]:
    """The first ``n_per_family`` samples of ``family`` in the validation stream
    ``train_stream(seed + VAL_STREAM_OFFSET)``: disjoint from the training stream of ``seed``
    and from the test split; with the default ``--val-samples 512`` its first 64 per family are
    the cached validation samples."""
    k = FAMILIES.index(family)
    stream = seed + VAL_STREAM_OFFSET
    return [train_sample(stream, i * len(FAMILIES) + k, IMAGE_SIZE) for i in range(n_per_family)]


def evaluate_split(model_dir, reducer: str, tokens: int, n_per_family: int = 200,
                   batch_size: int = 64, split: str = "test") -> dict:  # fmt: skip
    """Accuracy per family on the fixed test split (or, with ``split="val"``, the validation
    split of ``validation_split``), answers generated by the Engine."""
    from tokengine.engine import Engine

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    engine = Engine.from_pretrained(model_dir)
    out = {}
    for fam in FAMILIES:
        if split == "test":
            samples = test_split(fam, n_per_family, IMAGE_SIZE)
        else:
            samples = validation_split(fam, n_per_family)
        res = engine.generate([s.image for s in samples], [s.question for s in samples],
                              tokens=tokens, reducer=reducer, max_new_tokens=4,
                              batch_size=batch_size)  # fmt: skip
        ok = [normalize_answer(fam, t) == s.answer for t, s in zip(res.texts, samples, strict=True)]
        out[fam] = float(np.mean(ok))
    out["mean"] = float(np.mean([out[f] for f in FAMILIES]))
    return out


# ------------------------------------------------------------------------------ model card
def majority_baseline(n_per_family: int) -> dict[str, tuple[str, float]]:
    """Per family of the test split: the most common answer and its share."""
    out = {}
    for fam in FAMILIES:
        answers = [s.answer for s in test_split(fam, n_per_family, IMAGE_SIZE)]
        top = max(sorted(set(answers)), key=answers.count)
        out[fam] = (top, answers.count(top) / len(answers))
    return out


def clearly_lower(low: float, high: float, n: int) -> bool:
    """Whether accuracy ``low`` is below ``high`` by more than two binomial standard errors of
    ``high`` measured on ``n`` questions (a gap sampling noise rarely makes)."""
    return high - low > 2 * math.sqrt(high * (1 - high) / n)


def _score_table(scores: dict[str, dict], majority: dict[str, tuple[str, float]]) -> str:
    keys = list(scores)
    lines = ["| family | majority answer | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for fam in [*FAMILIES, "mean"]:
        if fam == "mean":
            base = f"{np.mean([m[1] for m in majority.values()]):.3f}"
        else:
            base = f"{majority[fam][1]:.3f} ({majority[fam][0]})"
        lines.append(f"| {fam} | {base} | " + " | ".join(f"{scores[k][fam]:.3f}" for k in keys)
                     + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


SELECT_NOTE = (
    "; then a cross-attention over the image alone makes each output token a weighted mix of "
    "image tokens (`select_image`)"
)


def model_card(summary: dict, vlm: VLM, size_bytes: int, name: str) -> str:
    """MODEL_CARD.md text from a training summary (training.json): what was run, for how long,
    and the scores, with the issue's quality targets checked against the test split."""
    variant, c, meta = summary["variant"], summary["stage_c"], summary["cache"]
    a = meta["stage_a"]
    test = summary.get("test", {})
    majority = majority_baseline(summary["test_per_family"])
    lines = [f"# {name}", ""]
    if test:
        top, low = test[f"{variant}@576"], test[f"{variant}@1"]
        checks = {
            "existence, colour, shape >= 0.90 at N_l=576":
                all(top[f] >= 0.9 for f in ("existence", "colour", "shape")),
            "mean >= 0.70 at N_l=576": top["mean"] >= 0.7,
            "N_l=1 clearly lower than N_l=576 on counting, text and chart (by more than two "
            "standard errors of a score on this many questions)":
                all(clearly_lower(low[f], top[f], summary["test_per_family"])
                    for f in ("counting", "text", "chart")),
        }  # fmt: skip
        lines += [
            f"Test split ({summary['test_per_family']} questions per family, answers generated "
            f"by the Engine): mean accuracy **{top['mean']:.3f}** at N_l=576 and "
            f"{low['mean']:.3f} at N_l=1 with `{variant}`; always answering each family's most "
            f"common answer scores {np.mean([m[1] for m in majority.values()]):.3f}.",
            "",
            "Quality targets set for tokengine-tiny:",
            *[f"- {k}: **{'met' if ok else 'not met'}**" for k, ok in checks.items()],
            "",
            _score_table(test, majority),
        ]
    v, t, r = vlm.config.vision, vlm.config.text, vlm.reducer.config
    n_params = sum(p.numel() for p in vlm.parameters())
    lines += [
        "## Architecture",
        f"- vision: CLIP ViT, {v.image_size} px, {v.patch_size} px patches "
        f"({v.image_size // v.patch_size}x{v.image_size // v.patch_size} tokens), width "
        f"{v.hidden_size}, {v.num_hidden_layers} layers, {v.num_attention_heads} heads, MLP "
        f"{v.intermediate_size}; last layer, CLS dropped.",
        f"- reducer `{variant}`: {r.num_queries} nested learned queries, {r.num_layers} blocks "
        f"[self-attention{' over queries + question' if variant == 'fusion' else ''} -> "
        f"qc cross-attention over image{' + question' if variant == 'fusion' else ''} -> MLP], "
        f"width {r.vision_dim}, {r.num_heads} heads{SELECT_NOTE if r.select_image else ''}. "
        "One checkpoint serves N_l = 1..576; `pool-*` reducers run on the same weights.",
        f"- reducer positions (learned, sin/cos-initialised, added to LayerNorm-ed tokens): "
        f"{r.question_positions} question positions, {r.image_positions} image positions.",
        f"- projector: mlp2x_gelu {v.hidden_size} -> {t.hidden_size} -> {t.hidden_size}.",
        f"- LM: Llama, width {t.hidden_size}, {t.num_hidden_layers} layers, "
        f"{t.num_attention_heads} heads / {t.num_key_value_heads} KV heads, SwiGLU "
        f"{t.intermediate_size}; word-level tokenizer of {t.vocab_size} entries; prompt "
        "`USER: <image>\\n{question} ASSISTANT:`, one-word answers.",
        f"- {n_params / 1e6:.2f}M parameters, fp32 safetensors; {size_bytes / 2**20:.2f} MiB "
        "on disk.",
        "",
        "## Training",
        f"Command (from the repository root; on {summary.get('device', 'the CPU')}; torch "
        "threads as given by `--threads`):",
        "",
        "```",
        " ".join(summary["argv"]),
        "```",
        "",
        *([f"Test split scored afterwards with `{' '.join(summary['test_argv'])}`.", ""]
          if "test_argv" in summary else []),
        f"- seed {summary['seed']}; stage c wall time {c['seconds'] / 60:.1f} min "
        f"({c['steps']} steps, {c['samples_seen']} samples); this run in all "
        f"{summary['wall_seconds_this_run'] / 60:.1f} min including validation"
        f"{' and the test split' if 'test' in summary and 'test_argv' not in summary else ''}.",
        f"- feature cache (stages a and b, shared by the variants; built by the first run that "
        f"found none): dense vision pre-training {a['steps']} steps x "
        f"{a['images'] // max(a['steps'], 1)} images in {a['seconds'] / 60:.1f} min, held-out "
        f"accuracy {a['patch_accuracy_fg']}; {meta['samples']} cached grids in "
        f"{meta['cache_seconds'] / 60:.1f} min.",
        f"- loss (answer + EOS cross-entropy, plus the training-only answer probe) first 20 "
        f"steps {np.mean(c['loss_first']):.3f}, last 20 {np.mean(c['loss_last']):.3f}.",
        "",
        "Validation (held-out slice of the training stream, first-token accuracy on cached "
        "features), during training:",
        "",
        *([f"- step {x['step']}: " + ", ".join(f"{k} {x[k]['mean']:.3f}" for k in x
                                              if isinstance(x[k], dict)) for x in c["val_log"]]
          or ["- (none)"]),
        "",
        "and at the end (the majority column is the test split's, for scale):",
        "",
        _score_table(c["val_final"], majority),
    ]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
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
        "--save-every", type=int, default=200, help="steps between state saves; default %(default)s"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/train_state.pt")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", default=None, help="start stage c from this model directory")
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
    if args.select_image and args.init:
        p.error("--select-image: a model given by --init keeps its own reducer")
    for flag, path in (("--init", args.init), ("--vision-from", args.vision_from)):
        if path and not (Path(path) / "config.json").is_file():
            p.error(f"{flag} {path} is not a model directory (no config.json)")
    if not 0 <= args.pool_share <= 1:
        p.error(f"--pool-share must be in [0, 1], got {args.pool_share}")
    at_least = {  # flag: the smallest value that means something
        "minutes": 0, "steps": 0, "vision_minutes": 0, "vision_steps": 0, "min_batch": 0,
        "probe_weight": 0, "val_every": 0, "save_every": 0, "workers": 0,
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


def score_test(out: Path, variant: str, per_family: int, log) -> dict[str, dict]:
    """Test-split accuracy of the model saved in ``out`` with ``variant`` and ``pool-avg``, at
    N_l = 576 and 1."""
    test = {}
    for tokens in (576, 1):
        for reducer in (variant, "pool-avg"):
            t = time.perf_counter()
            test[f"{reducer}@{tokens}"] = evaluate_split(out, reducer, tokens, per_family)
            log(f"test {reducer}@{tokens}: {test[f'{reducer}@{tokens}']} "
                f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
    return test


def write_card(out: Path, summary: dict, vlm: VLM) -> None:
    """training.json and MODEL_CARD.md of the model in ``out``."""
    (out / LOG_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    # the checkpoint's own files: not the resume state, nor logs copied in beside it
    size = sum(f.stat().st_size for f in out.iterdir()
               if f.is_file() and f.name != STATE_FILE and f.suffix != ".log")  # fmt: skip
    (out / "MODEL_CARD.md").write_text(model_card(summary, vlm, size, out.resolve().name))


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

    init = VLM.from_pretrained(args.init) if args.init else None
    select = init.reducer.config.select_image if init else args.select_image
    vlm = random_tiny(args.seed, select_image=select).to(args.device)
    if init:  # continue from a saved model (fresh optimiser and schedule)
        vlm.load_state_dict(init.state_dict())
        log(f"initialised from {args.init}")
    if args.vision_from:  # its ViT; the reducer, projector and LM as initialised above
        vlm.vision.load_state_dict(VLM.from_pretrained(args.vision_from).vision.state_dict())
        log(f"ViT from {args.vision_from}")
    vision_source = args.init or args.vision_from
    # stage c starts from this RNG state whether or not stages a and b run in this process
    stage_c_rng = torch.get_rng_state()
    if not (cache / "meta.json").is_file():
        # a model to continue (or lend its ViT) brings that ViT: cache the grids it makes
        stage_a = (
            init_stage_a(Path(vision_source)) if vision_source else train_vision(vlm, args, log)
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
