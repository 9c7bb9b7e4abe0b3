"""The fresh-text cache of this experiment: the 50,000-grid cache of the shipped ViT (stream
indices 283,008..333,007, seed 0; the first half of the shipped chain's cache) with 31,250
text samples that no stage of the shipped chain saw (stream indices from 383,008, past the
chain's 100,000-sample cache), five after every eight old samples so that they are spread
through the first pass.

    python bench/results/cpu-fresh-text-2026-11-28/make_cache.py OLD_CACHE NEW_CACHE
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokengine.data.synthetic import FAMILIES, train_sample
from tokengine.models.tiny import IMAGE_SIZE, shipped_path
from tokengine.models.vlm import VLM
from tokengine.training.cache import _records, cache_batch, encode_pixels

NEW_TEXT = 31_250  # text's share of the batches stays 37.5%, as in T2, with text weight 1
FIRST_NEW = 383_008  # stage a's 283,008 images + the chain's 100,000 cached samples
EVERY, INSERT = 8, 5  # old samples, new text samples

old, new = Path(sys.argv[1]), Path(sys.argv[2])
vlm = VLM.from_pretrained(shipped_path())
vit = torch.load(old / "vision.pt")
assert all(torch.equal(vit[k], v) for k, v in vlm.vision.state_dict().items()), "another ViT"
meta = json.loads((old / "meta.json").read_text())
start = meta["stage_a"]["images"]
assert start == 283_008 and meta["samples"] == 50_000 and meta["seed"] == 0, meta
recs = json.loads((old / "records.json").read_text())
text = FAMILIES.index("text")
assert [r["family"] for r in recs] == [i % len(FAMILIES) for i in range(len(recs))]
assert FIRST_NEW % len(FAMILIES) == start % len(FAMILIES) == 0
# the old records are those stream indices: regenerate a few and compare
for i in (0, text, len(recs) - 1):
    assert _records(vlm, [train_sample(0, start + i, IMAGE_SIZE)]) == [recs[i]], i

t0 = time.perf_counter()
new_feats, new_recs, chunk = [], [], 256
indices = [FIRST_NEW + len(FAMILIES) * j + text for j in range(NEW_TEXT)]
for i in tqdm(range(0, NEW_TEXT, chunk), desc="fresh text", file=sys.stdout, mininterval=10):
    samples = [train_sample(0, k, IMAGE_SIZE) for k in indices[i : i + chunk]]
    assert all(s.family == "text" for s in samples)
    pixels, batch = cache_batch(samples, vlm.image_processor)
    new_feats.append(encode_pixels(vlm, pixels))
    new_recs += _records(vlm, batch)
new_grids = np.concatenate(new_feats)

new.mkdir(parents=True)
old_grids = np.load(old / "features.npy", mmap_mode="r")
total = len(recs) + NEW_TEXT
out = np.lib.format.open_memmap(new / "features.npy", mode="w+", dtype=np.float16,
                                shape=(total, *old_grids.shape[1:]))  # fmt: skip
order, at = [], 0
for b in range(len(recs) // EVERY):
    o = slice(b * EVERY, (b + 1) * EVERY)
    t = slice(b * INSERT, (b + 1) * INSERT)
    out[at : at + EVERY] = old_grids[o]
    out[at + EVERY : at + EVERY + INSERT] = new_grids[t]
    order += recs[o] + new_recs[t]
    at += EVERY + INSERT
assert at == total == len(order)
out.flush()
del out
(new / "records.json").write_text(json.dumps(order))
for name in ("val_features.npy", "val_records.json", "vision.pt"):
    shutil.copy(old / name, new / name)
meta.update(samples=total, fresh_text={"indices": [indices[0], indices[-1]], "count": NEW_TEXT,
            "seconds": time.perf_counter() - t0, "from": str(old)})  # fmt: skip
(new / "meta.json").write_text(json.dumps(meta, indent=2))
print(f"{new}: {total} samples, {sum(r['family'] == text for r in order)} text")
