"""Engine benchmarks, each beside its baseline in the same run.

- end-to-end greedy generation (batch 1, 16 new tokens) on a tiny random LLaVA: tokengine's
  Engine, eager and with ``compile=True`` (from a PIL image: preprocessing, tokenisation,
  vision, prefill, decode) against
  ``transformers``' ``LlavaForConditionalGeneration.generate`` on the same weights (given
  ready-made input_ids and pixel_values, so HF is spared the preprocessing);
- LM prefill of a 2-layer slice of LLaVA-1.5-7B's language model (random weights) with the
  prompt carrying N_l image tokens: the latency vs N_l that token reduction buys.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DEVICE, run
from PIL import Image

from tokengine.engine import Engine
from tokengine.models import VLM, VLMConfig
from tokengine.models.tiny import build_tokenizer

transformers = pytest.importorskip("transformers")
NEW_TOKENS = 16
QUESTION = "what colour is the shape in the top left ?"


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A tiny random LLaVA saved by transformers, loaded by both implementations."""
    tokenizer = build_tokenizer()
    config = transformers.LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=96,
            patch_size=8,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=-1,
            pad_token_id=0,
        ),  # no EOS: all 16 tokens are made
        image_token_index=4,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # fan-in scaled weights so greedy decoding is not degenerate
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    path = tmp_path_factory.mktemp("tiny-llava")
    hf.save_pretrained(path)
    ours = VLM.from_pretrained(path)
    ours.tokenizer = tokenizer
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 100, 3), np.uint8))
    return hf.to(DEVICE), ours.to(DEVICE), image


def test_generate_tokengine_engine(benchmark, tiny_llava):
    _, ours, image = tiny_llava
    engine = Engine(ours)
    benchmark.group = f"generate tiny LLaVA, batch 1, {NEW_TOKENS} new tokens"
    result = engine.generate([image], [QUESTION], max_new_tokens=NEW_TOKENS)
    assert len(result.token_ids[0]) == NEW_TOKENS
    run(benchmark, lambda: engine.generate([image], [QUESTION], max_new_tokens=NEW_TOKENS), 0)


def test_generate_tokengine_engine_compiled(benchmark, tiny_llava):
    """The same with ``Engine(compile=True)``: vision, prefill and decode step as torch.compile
    graphs (compiled in the warm-up call below, which the timing excludes)."""
    _, ours, image = tiny_llava
    engine = Engine(ours, compile=True)
    benchmark.group = f"generate tiny LLaVA, batch 1, {NEW_TOKENS} new tokens"
    result = engine.generate([image], [QUESTION], max_new_tokens=NEW_TOKENS)
    assert len(result.token_ids[0]) == NEW_TOKENS
    run(benchmark, lambda: engine.generate([image], [QUESTION], max_new_tokens=NEW_TOKENS), 0)


def test_generate_baseline_transformers(benchmark, tiny_llava):
    hf, ours, image = tiny_llava
    engine = Engine(ours)
    ids = torch.tensor([engine._prompt_ids(QUESTION, ours.config.num_image_tokens)], device=DEVICE)
    pixels = ours.image_processor([image]).to(DEVICE)
    benchmark.group = f"generate tiny LLaVA, batch 1, {NEW_TOKENS} new tokens"

    def generate():
        with torch.inference_mode():
            return hf.generate(
                input_ids=ids,
                pixel_values=pixels,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )

    assert generate().shape[1] == ids.shape[1] + NEW_TOKENS
    run(benchmark, generate, 0)


@pytest.fixture(scope="module")
def llava7b_slice():
    """LLaVA-1.5-7B's language model cut to 2 layers, random weights (float32 on CPU)."""
    config = VLMConfig.llava_1_5_7b().text
    config.num_hidden_layers = 2
    from tokengine.models.lm import LlamaDecoder

    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(DEVICE):
        lm = LlamaDecoder(config).to(dtype).eval()
    return lm, dtype


@pytest.mark.parametrize("tokens", [1, 16, 64, 144, 576])
def test_prefill_llava7b_2layer_slice(benchmark, llava7b_slice, tokens):
    lm, dtype = llava7b_slice
    text = 40  # "USER: <image>\n{question} ASSISTANT:" around the image tokens
    S = text + tokens
    embeds = torch.randn(1, S, lm.config.hidden_size, device=DEVICE, dtype=dtype)
    slots = torch.arange(S, device=DEVICE)
    mask = torch.ones(1, S, dtype=torch.bool, device=DEVICE)
    lm.setup_cache(1, S, dtype, DEVICE)
    benchmark.group = "LM prefill, 2-layer slice of LLaVA-1.5-7B"

    def prefill():
        with torch.inference_mode():
            return lm(embeds, slots, slots[None], mask, last_only=True)

    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    run(benchmark, prefill, weights, tokens=tokens, seq_len=S)
