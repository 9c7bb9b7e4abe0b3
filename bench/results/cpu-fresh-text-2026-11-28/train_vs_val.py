"""First-token accuracy per family of a model on cached training samples and on the cached
validation slice (``tokengine.training.stage_c.validate``, fusion at N_l = 1 and 576).

    python bench/results/cpu-fresh-text-2026-11-28/train_vs_val.py MODEL CACHE N [START]

scores records START..START+N-1 of CACHE's training samples, then all of its validation slice.
"""

import json
import sys

import numpy as np
import torch

from tokengine.models import VLM
from tokengine.training.cache import load_features
from tokengine.training.stage_c import validate

torch.set_num_threads(2)
model, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = int(sys.argv[4]) if len(sys.argv) > 4 else 0
vlm = VLM.from_pretrained(model)
grids = np.load(f"{cache}/features.npy", mmap_mode="r")[start : start + n]
feats = torch.from_numpy(np.array(grids))
recs = json.loads(open(f"{cache}/records.json").read())[start : start + n]
val_feats = load_features(f"{cache}/val_features.npy", "cpu")
val_recs = json.loads(open(f"{cache}/val_records.json").read())
for name, f, r in [(f"train[{start}:{start + n}]", feats, recs), ("val", val_feats, val_recs)]:
    for key, acc in validate(vlm, f, r, "fusion", tokens=(1, 576), pool=False).items():
        print(name, key, " ".join(f"{fam}={a:.3f}" for fam, a in acc.items()), flush=True)
