"""tokengine-tiny: the small default model (tokenizer, shapes, random init, packaged weights).

A word-level tokenizer over the synthetic suite's closed vocabulary, a 96 px CLIP ViT with
4 px patches (a 24×24 = 576-token grid, like LLaVA-1.5's), a fusion reducer with 576 nested
queries and a 2-layer Llama. Trained by ``python -m tokengine.train``; the shipped weights live
in ``tokengine/assets/<name>/`` (see :func:`shipped_path`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from tokengine.models.config import LMConfig, VisionConfig, VLMConfig
from tokengine.models.preprocess import ImageProcessor
from tokengine.models.reducer import FusionConfig, FusionReducer
from tokengine.models.vlm import VLM

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
IMAGE_SIZE, PATCH_SIZE = 96, 4  # 24×24 = 576 patches
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = "tokengine-tiny"
_WORD = re.compile(r"\w+|[^\w\s]+")


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    """The suite's words, lower-cased and sorted: questions (from 64 seeds per family at 48 px;
    questions do not depend on the image size), every answer and the prompt's words."""
    from tokengine.data.synthetic import FAMILIES, answer_vocabulary, generate

    words = {"user", ":", "assistant"}
    for family in FAMILIES:
        for seed in range(64):
            words.update(_WORD.findall(generate(family, seed, 48).question.lower()))
    for answer in answer_vocabulary():
        words.update(_WORD.findall(answer.lower()))
    return tuple(sorted(words))


def build_tokenizer() -> Tokenizer:
    """Deterministic word-level tokenizer: ids 0..4 are ``<pad> <s> </s> <unk> <image>``, then
    the suite's words in sorted order. Lower-cases its input and prepends ``<s>``."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in _words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return tok


def tiny_config(vocab_size: int) -> VLMConfig:
    """The shapes of tokengine-tiny (about 0.6M parameters besides the fusion reducer)."""
    vision = VisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu",
    )
    text = LMConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    return VLMConfig(
        vision=vision,
        text=text,
        image_token_index=IMAGE_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_fusion_config(select_image: bool = False) -> FusionConfig:
    """The fusion reducer of tokengine-tiny: 576 nested queries over 64-wide image tokens
    (``select_image``: see :class:`FusionConfig`)."""
    return FusionConfig(
        vision_dim=64,
        text_dim=128,
        num_queries=576,
        num_layers=2,
        num_heads=2,
        mlp_ratio=2.0,
        question_positions=20,
        image_positions=576,  # the 24x24 grid
        select_image=select_image,
    )


def random_tiny(seed: int = 0, select_image: bool = False) -> VLM:
    """tokengine-tiny with random weights (tokenizer, fusion reducer, image processor set);
    ``select_image`` gives the reducer the readout of :class:`FusionConfig` of that name."""
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vlm = VLM(tiny_config(tokenizer.get_vocab_size()))
        vlm.reducer = FusionReducer(tiny_fusion_config(select_image))
    vlm.tokenizer = tokenizer
    vlm.image_processor = ImageProcessor.for_size(IMAGE_SIZE)
    return vlm.eval()


def shipped_path(name: str = DEFAULT_MODEL) -> Path:
    """The packaged checkpoint directory of ``name`` (``tokengine/assets/<name>/``)."""
    return ASSETS / name


def available_models() -> list[str]:
    """Names of the packaged checkpoints (directories with a config.json)."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())


__all__ = [
    "available_models",
    "build_tokenizer",
    "random_tiny",
    "shipped_path",
    "tiny_config",
    "tiny_fusion_config",
]
