"""The third-block start of the text experiment: the shipped tokengine-tiny with one more fusion
block whose residual outputs (self-attention, cross-attention, MLP) start at zero, so that the
model answers exactly as the shipped one until stage c trains the block.

    python bench/results/cpu-text-2026-11-27/make_init.py OUT_DIR
"""

import sys
from dataclasses import replace

import torch
from torch import nn

from tokengine.models.reducer import FusionReducer
from tokengine.models.tiny import shipped_path
from tokengine.models.vlm import VLM

torch.manual_seed(0)
vlm = VLM.from_pretrained(shipped_path())
cfg = vlm.reducer.config
deeper = FusionReducer(replace(cfg, num_layers=cfg.num_layers + 1))
missing = deeper.load_state_dict(vlm.reducer.state_dict(), strict=False).missing_keys
assert all(k.startswith(f"blocks.{cfg.num_layers}.") for k in missing), missing
new = deeper.blocks[cfg.num_layers]
for out in (new.self_attn.out_proj, new.cross_attn.o_proj, new.mlp[2]):
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
# the same reduced tokens as the shipped reducer's, on a random grid and question
image, question = torch.randn(2, 576, cfg.vision_dim), torch.randn(7, cfg.text_dim)
cu = torch.tensor([0, 3, 7], dtype=torch.int32)
with torch.no_grad():
    assert torch.equal(deeper(image, 16, question, cu), vlm.reducer(image, 16, question, cu))
vlm.reducer = deeper
vlm.save_pretrained(sys.argv[1])
print(f"saved {sys.argv[1]}: {cfg.num_layers + 1} fusion blocks")
