"""Two stage-c starting points on the shipped ViT: PyTorch's default init (I0, what
`train --vision-from` makes) and a Llama-style init (I1: every Linear and the embedding of the
LM and projector N(0, 0.02), biases 0, as transformers' initializer_range)."""

import sys

import torch
from torch import nn

from tokengine.models.tiny import random_tiny, shipped_path
from tokengine.models.vlm import VLM

base = random_tiny(0)
base.vision.load_state_dict(VLM.from_pretrained(shipped_path()).vision.state_dict())
base.save_pretrained(sys.argv[1] + "/I0")
torch.manual_seed(1234)
for part in (base.lm, base.projector):
    for mod in part.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, std=0.02)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)
base.save_pretrained(sys.argv[1] + "/I1")
