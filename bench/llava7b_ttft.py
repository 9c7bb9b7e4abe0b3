"""Time to first token per N_l for a LLaVA-1.5-7B-shaped model with random weights (CUDA).

    python bench/llava7b_ttft.py [--tokens 1,4,16,64,144,256,576] [--batch-sizes 1,8]
                                 [--repeats 10] [--json PATH]

CLIP ViT-L/14-336 + Vicuna-7B shapes in float16 (``VLMConfig.llava_1_5_7b``), with a fusion
reducer of tokengine's design at that width (2 blocks, 16 heads, 576 queries). The weights
are random, so the answers mean nothing; the work per stage is the real model's. Each point
runs ``Engine.generate`` (eager) from a PIL image: preprocessing, vision encoder, reducer,
projector and LM prefill make the TTFT (CUDA events), then 8 greedy decode steps.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from tokengine.engine import Engine
from tokengine.models import VLM, VLMConfig
from tokengine.models.reducer import FusionConfig, FusionReducer

QUESTION = "what is the colour of the small object to the left of the large red cube ?"
NEW_TOKENS = 8


def word_tokenizer(config: VLMConfig) -> Tokenizer:
    """A whitespace tokenizer of the prompt's words (others become <unk>), with <image> at the
    model's image_token_index: random weights need no real vocabulary."""
    words = ["<unk>", "<s>", "</s>", "USER", ":", "ASSISTANT", *QUESTION.split()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    vocab["<image>"] = config.image_token_index
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<image>"])
    return tok


def build_engine(config: VLMConfig, device: str, dtype: torch.dtype) -> Engine:
    """Random weights for ``config`` plus a fusion reducer with as many heads as the ViT."""
    torch.manual_seed(0)
    with torch.device(device):
        vlm = VLM(config)
        vlm.reducer = FusionReducer(
            FusionConfig(
                vision_dim=config.vision.hidden_size,
                text_dim=config.text.hidden_size,
                num_heads=config.vision.num_attention_heads,
                question_positions=32,
                image_positions=config.num_image_tokens,
            )
        )
    return Engine(vlm.to(dtype).eval(), tokenizer=word_tokenizer(config))


def measure(engine: Engine, reducer: str, tokens: int, batch: int, repeats: int) -> dict:
    size = engine.vlm.config.vision.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8))
    runs = []
    for i in range(repeats + 2):  # two warm-up calls: cuBLAS handles, Triton compilation
        r = engine.generate(
            [image] * batch,
            [QUESTION] * batch,
            tokens=tokens,
            reducer=reducer,
            max_new_tokens=NEW_TOKENS,
            batch_size=batch,
        )
        if i >= 2:
            runs.append(r)

    def median(key: str) -> float:
        return statistics.median(r.timings[key] for r in runs)

    return {
        "reducer": reducer,
        "tokens": tokens,
        "batch": batch,
        "ttft_ms": statistics.median(r.ttft_ms[0] for r in runs),
        "vision_ms": median("vision_ms"),
        "reduce_ms": median("reduce_ms"),
        "prefill_ms": median("prefill_ms"),
        "decode_tokens_per_s": median("decode_tokens_per_s"),
        "peak_memory_mb": max(r.timings["peak_memory_mb"] for r in runs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="1,4,16,64,144,256,576")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write every point here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("llava7b_ttft.py needs a CUDA device")
    engine = build_engine(VLMConfig.llava_1_5_7b(), "cuda", torch.float16)
    points = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        points.append(measure(engine, "none", 576, batch, args.repeats))
        for reducer in ("pool-avg", "fusion"):
            for tokens in (int(t) for t in args.tokens.split(",")):
                points.append(measure(engine, reducer, tokens, batch, args.repeats))
    print(f"{torch.cuda.get_device_name()}, LLaVA-1.5-7B shapes, float16, random weights, eager")
    head = f"{'reducer':<10}{'N_l':>5}{'batch':>6}{'TTFT ms':>9}{'vision':>8}{'reduce':>8}"
    print(head + f"{'prefill':>9}{'decode tok/s':>14}{'peak MiB':>10}")
    for q in points:
        print(
            f"{q['reducer']:<10}{q['tokens']:>5}{q['batch']:>6}{q['ttft_ms']:>9.2f}"
            f"{q['vision_ms']:>8.2f}{q['reduce_ms']:>8.2f}{q['prefill_ms']:>9.2f}"
            f"{q['decode_tokens_per_s']:>14.0f}{q['peak_memory_mb']:>10.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
