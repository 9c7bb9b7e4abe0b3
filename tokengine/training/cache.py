"""Stage b of training tokengine-tiny: the feature cache (``--cache-samples``).

The frozen ViT's 24×24×64 grids of that many training-stream samples, fp16 in a ``.npy``
memmap under ``--cache`` with the prompts' token ids, and the same for the validation slice.
Both variants reuse one cache (a run that finds it skips stages a and b).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokengine.data.synthetic import FAMILIES, GRID, asked_cells, train_stream
from tokengine.engine import LLAVA_TEMPLATE
from tokengine.models import VLM
from tokengine.models.preprocess import preprocess_images
from tokengine.models.tiny import IMAGE_ID, IMAGE_SIZE
from tokengine.training.common import VAL_STREAM_OFFSET, model_device, stream_batches


def cache_batch(samples, processor) -> tuple:
    """Stage b's inputs: pixels (B, 3, H, W) and the samples without their images."""
    pixels = preprocess_images([s.image for s in samples], processor)
    return pixels, [dataclasses.replace(s, image=None) for s in samples]


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
        rec = {
            "pre": pre, "post": post, "answer": ans[0], "family": FAMILIES.index(s.family),
            "question": tok.encode(s.question, add_special_tokens=False).ids,
        }  # fmt: skip
        if s.family == "text":  # where the asked character is, for --attend-weight
            rec["attend"] = asked_cells(s).tolist()
        recs.append(rec)
    return recs


@torch.inference_mode()
def encode_pixels(vlm: VLM, pixels: torch.Tensor, dtype: torch.dtype = torch.float16) -> np.ndarray:
    """The frozen ViT's grids (B, 576, Dv) on the host, in ``dtype`` (the cache's float16 by
    default), of pixels (B, 3, H, W)."""
    pixels = pixels.to(model_device(vlm), vlm.dtype)
    return vlm.encode_images(pixels).to(dtype).cpu().numpy()


def encode_samples(
    vlm: VLM, samples, chunk: int = 128, dtype: torch.dtype = torch.float16
) -> np.ndarray:
    """:func:`encode_pixels` of the samples' images, ``chunk`` at a time."""
    return np.concatenate([
        encode_pixels(vlm, preprocess_images([s.image for s in samples[i : i + chunk]],
                                             vlm.image_processor), dtype)
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


def load_features(path: Path, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """A cached ``.npy`` of grids (N, 576, Dv) float16, on ``device``, read a chunk at a time
    (no second host copy of a cache of many GiB)."""
    src = np.load(path, mmap_mode="r")
    out = torch.empty(src.shape, dtype=torch.float16, device=device)
    for i in range(0, len(src), chunk):
        out[i : i + chunk] = torch.from_numpy(np.array(src[i : i + chunk]))
    return out
