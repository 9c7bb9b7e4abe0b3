"""Stage c of training tokengine-tiny: reducer + projector + LM on the cached grids
(``--minutes`` or ``--steps``).

Each batch draws N_l from ``--tokens`` (default: uniformly from {1, 4, 16, 64, 144, 256, 576},
log-uniform over the sweep's points) and goes through the fusion reducer — with the question
(``--variant fusion``) or without (``fusion-noq``, the paper's ablation) — or, for a
``--pool-share`` of batches (25%), through ``pool-avg``. The prompt is the Engine's
(``USER: <image>\\n{question} ASSISTANT:``, ``<s>`` first, ``<image>`` expanded to N_l slots);
the loss is cross-entropy on the answer token and EOS, plus (weight ``--probe-weight``) a
training-only linear probe that reads the answer off the mean reduced token and the mean
question embedding, a short gradient path into the reducer (:class:`AnswerProbe`; not saved),
and (weight ``--attend-weight``, default 0) on text questions, :func:`attend_loss`: the last
fusion block's cross-attention asked to put its image mass on the asked character's patches.
Validation runs on a held-out slice of the training stream (another stream seed, never the test
split). State is saved every ``--save-every`` steps; ``--resume`` continues from it.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tokengine.data.synthetic import FAMILIES, GRID
from tokengine.models import VLM
from tokengine.models.reducer import packed_segment_ids, recorded_attn_mass, reduce_tokens
from tokengine.models.tiny import EOS_ID, IMAGE_ID, PAD_ID
from tokengine.training.cache import load_features
from tokengine.training.common import STATE_FILE, model_device, optimizer_step, segment_mean
from tokengine.validation import pool_tokens

TOKENS = (1, 4, 16, 64, 144, 256, 576)  # --tokens' default: the sweep's N_l
VAL_TOKENS = (1, 16, 144, 576)  # the N_l of the final cached validation


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


def attend_loss(mass: torch.Tensor, recs: list[dict]) -> torch.Tensor:
    """Mean over the batch of -log(share of the image attention mass on the asked patches),
    over the records that name them (``"attend"``; 0 for the others).

    ``mass`` (B, N): the attention mass each image token received (``return_attn_mass``).
    """
    target = torch.zeros(mass.shape, dtype=torch.bool)
    for b, r in enumerate(recs):
        target[b, r.get("attend", [])] = True
    target = target.to(mass.device)
    share = (mass * target).sum(1) / mass.sum(1).clamp_min(1e-12)
    named = target.any(1)
    return -(share.clamp_min(1e-6).log() * named).sum() / len(recs)


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
    if args.attend_weight and not any("attend" in r for r in recs):
        raise ValueError(
            f"--attend-weight: the cache {cache} names no asked patches (its records have no "
            "'attend'); build a new cache"
        )
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
        recording = (
            recorded_attn_mass(vlm.reducer.blocks[-1].cross_attn)
            if args.attend_weight and reducer != "pool-avg"
            else nullcontext([])
        )
        with recording as masses:
            logits, targets, probed = lm_batch(vlm, feats[idx].float(), batch, tokens, reducer,
                                               probe)  # fmt: skip
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if reducer != "pool-avg":
            loss = loss + args.probe_weight * F.cross_entropy(probed, targets[:, 0])
        if masses:
            loss = loss + args.attend_weight * attend_loss(masses[0], batch)
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
