"""Text accuracy of a tokengine-tiny checkpoint when its fusion blocks may only look at chosen
image patches: the asked character's, or the whole word's (the question's tokens stay in the
softmax as always).

    python bench/results/cpu-oracle-attention-2026-11-28/oracle_attention.py MODEL [MODEL ...]
        [--questions 400] [--tokens 1,576] [--json PATH]

For each model, N_l and condition, the text questions of the validation split are answered by
the Engine with each chosen block's cross-attention seeing only the allowed image patches
(and the question). Conditions: ``as trained`` (no change), ``all patches`` (the masked
path with every patch allowed: must give the same answers, which checks the path), ``word,
both blocks``, ``asked, last block`` and ``asked, both blocks``.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import numpy as np
import torch

from tokengine.data.synthetic import GRID, asked_cells, normalize_answer
from tokengine.engine import Engine
from tokengine.models import tiny
from tokengine.ops import qc_cross_attention
from tokengine.training.scoring import validation_split


def masked_cross_attention(self, queries, image, text=None, cu_seqlens_txt=None, *,
                           return_attn_mass=False):  # fmt: skip
    """QCCrossAttention.forward with only the image keys in ``self.allowed`` (B, N): each sample
    is one call of the op on its allowed patches and its question (a masked-out key is one the
    softmax never sees, as with a -inf logit)."""
    if return_attn_mass:
        raise ValueError("the masked path does not return the mass")
    B, L, _ = queries.shape
    N, H, Hkv, Dh = image.shape[1], self.num_heads, self.num_kv_heads, self.head_dim
    if self.allowed.shape != (B, N):
        raise ValueError(f"allowed is {tuple(self.allowed.shape)}, the batch needs {(B, N)}")
    q = self.q_proj(queries).view(B, L, H, Dh)
    k = self.k_proj(image).view(B, N, Hkv, Dh)
    v = self.v_proj(image).view(B, N, Hkv, Dh)
    k_txt = self.k_proj(text).view(-1, Hkv, Dh)
    v_txt = self.v_proj(text).view(-1, Hkv, Dh)
    outs = []
    for b in range(B):
        s, e = int(cu_seqlens_txt[b]), int(cu_seqlens_txt[b + 1])
        keep = self.allowed[b]
        cu = torch.tensor([0, e - s], dtype=torch.int32)
        outs.append(qc_cross_attention(q[b : b + 1], k[b : b + 1, keep], v[b : b + 1, keep],
                                       k_txt[s:e], v_txt[s:e], cu,
                                       softmax_scale=self.softmax_scale))  # fmt: skip
    return self.o_proj(torch.cat(outs).reshape(B, L, H * Dh))


def answers(engine: Engine, samples, tokens: int, blocks, allowed, batch: int) -> list[str]:
    """The Engine's answers with the cross-attention of ``blocks`` limited to ``allowed``."""
    attns = [engine.vlm.reducer.blocks[i].cross_attn for i in blocks]
    for a in attns:
        a.forward = types.MethodType(masked_cross_attention, a)
    out = []
    try:
        for i in range(0, len(samples), batch):
            part = samples[i : i + batch]
            for a in attns:
                a.allowed = torch.from_numpy(allowed[i : i + batch])
            res = engine.generate([s.image for s in part], [s.question for s in part],
                                  tokens=tokens, reducer="fusion", max_new_tokens=4,
                                  batch_size=len(part))  # fmt: skip
            out += res.texts
    finally:
        for a in attns:
            del a.forward, a.allowed
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--questions", type=int, default=400)
    p.add_argument("--tokens", default="1,576")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    samples = validation_split("text", args.questions)
    n_cells = GRID * GRID
    asked = np.zeros((len(samples), n_cells), dtype=bool)
    word = np.zeros_like(asked)
    for i, s in enumerate(samples):
        asked[i, asked_cells(s)] = True
        word[i] = np.isin(s.meta["id_grid"].ravel(), s.meta["char_ids"])
    everything = np.ones_like(asked)
    conditions = {  # name: (blocks whose attention is limited, allowed patches)
        "as trained": ((), everything),
        "all patches": ((0, 1), everything),
        "word, both blocks": ((0, 1), word),
        "asked, last block": ((1,), asked),
        "asked, both blocks": ((0, 1), asked),
    }
    results = {}
    for model in args.models:
        path = tiny.shipped_path(model) if model in tiny.available_models() else Path(model)
        engine = Engine.from_pretrained(path)
        for tokens in map(int, args.tokens.split(",")):
            row, base = {}, None
            for name, cond in conditions.items():
                t = time.perf_counter()
                texts = answers(engine, samples, tokens, *cond, args.batch_size)
                base = texts if name == "as trained" else base
                if name == "all patches" and texts != base:
                    raise RuntimeError("the masked path with every patch allowed changed answers")
                got = [
                    normalize_answer("text", x) == s.answer
                    for x, s in zip(texts, samples, strict=True)
                ]
                row[name] = float(np.mean(got))
                print(f"{model} N_l={tokens} {name}: {row[name]:.3f} "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
            results[f"{model}@{tokens}"] = row
    print("| model, N_l | " + " | ".join(conditions) + " |")
    print("|---|" + "---|" * len(conditions))
    for key, row in results.items():
        print(f"| {key} | " + " | ".join(f"{row[c]:.3f}" for c in conditions) + " |")
    if args.json:
        args.json.write_text(json.dumps({"questions": args.questions, "results": results},
                                        indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
