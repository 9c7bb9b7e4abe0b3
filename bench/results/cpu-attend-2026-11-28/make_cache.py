"""The attention-target cache of this experiment: ``../cpu-fresh-text-2026-11-28/``'s cache
(the same grids, linked, not copied) whose text records also name the asked character's
patches (``"attend"``, as ``tokengine.training.cache`` now writes them), found by making each
text sample again from its stream index.

    python bench/results/cpu-attend-2026-11-28/make_cache.py FRESH_TEXT_CACHE NEW_CACHE
"""

import json
import sys
from pathlib import Path

from tqdm import tqdm

from tokengine.data.synthetic import FAMILIES, train_sample
from tokengine.models.tiny import IMAGE_SIZE, shipped_path
from tokengine.models.vlm import VLM
from tokengine.training.cache import _records

OLD_START, FIRST_NEW = 283_008, 383_008  # as in ../cpu-fresh-text-2026-11-28/make_cache.py
EVERY, INSERT = 8, 5

src, new = Path(sys.argv[1]), Path(sys.argv[2])
vlm = VLM.from_pretrained(shipped_path())
recs = json.loads((src / "records.json").read_text())
text = FAMILIES.index("text")


def stream_index(i: int) -> int:
    block, at = divmod(i, EVERY + INSERT)
    if at < EVERY:
        return OLD_START + block * EVERY + at
    return FIRST_NEW + len(FAMILIES) * (block * INSERT + at - EVERY) + text


named = 0
for i, rec in enumerate(tqdm(recs, desc="attend", file=sys.stdout, mininterval=10)):
    if rec["family"] != text:
        continue
    (made,) = _records(vlm, [train_sample(0, stream_index(i), IMAGE_SIZE)])
    attend = made.pop("attend")
    assert made == rec, i  # the same sample: prompt, question and answer
    rec["attend"] = attend
    named += bool(attend)
new.mkdir(parents=True)
for name in ("features.npy", "val_features.npy"):
    (new / name).symlink_to((src / name).resolve())
for name in ("val_records.json", "vision.pt"):
    (new / name).write_bytes((src / name).read_bytes())
(new / "records.json").write_text(json.dumps(recs))
meta = json.loads((src / "meta.json").read_text())
meta["attend"] = {"from": str(src), "text_records_named": named}
(new / "meta.json").write_text(json.dumps(meta, indent=2))
print(f"{new}: {named} text records name their asked patches")
