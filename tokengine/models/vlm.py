"""The tokengine VLM: CLIP vision tower -> (reducer) -> projector -> Llama decoder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from tokengine.models import loading
from tokengine.models.config import VLMConfig
from tokengine.models.lm import LlamaDecoder
from tokengine.models.preprocess import PREPROCESSOR_FILE, ImageProcessor
from tokengine.models.projector import Projector
from tokengine.models.reducer import FusionConfig, FusionReducer
from tokengine.models.vision import VisionTower


class VLM(nn.Module):
    """LLaVA-family model. With ``reducer`` None its logits match HF's
    ``LlavaForConditionalGeneration`` on the same weights.

    ``reducer`` is an optional module mapping vision features (B, N, Dv) to fewer tokens; it
    is None for HF checkpoints (every image keeps ``config.num_image_tokens`` tokens).
    ``image_processor`` and ``tokenizer`` (a ``tokenizers.Tokenizer``, or None) travel with
    the weights: ``from_pretrained`` reads them from the model directory when present.
    """

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTower(
            config.vision, config.feature_layer_index, config.vision_feature_select_strategy
        )
        self.projector = Projector(
            config.vision.hidden_size,
            config.text.hidden_size,
            config.projector_hidden_act,
            config.multimodal_projector_bias,
        )
        self.lm = LlamaDecoder(config.text)
        self.reducer: nn.Module | None = None
        self.image_processor = ImageProcessor.for_size(config.vision.image_size)
        self.tokenizer: Tokenizer | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.lm.embed_tokens.weight.dtype

    # ----------------------------------------------------------------------------- images
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> vision features (B, N, Dv) of the feature layer
        (N = 576 for LLaVA-1.5: CLS dropped under the "default" strategy)."""
        return self.vision(pixel_values)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features (B, n, Dv) -> language-model embeddings (B, n, Dlm)."""
        return self.projector(features)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> (B, n, Dlm), the embeddings that replace the image
        placeholders (n = config.num_image_tokens without a reducer)."""
        return self.project(self.encode_images(pixel_values))

    def embed_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """input_ids (B, S) with each image's placeholder already expanded to n tokens ->
        (B, S, Dlm): token embeddings with the images' embeddings written, in order, over the
        ``image_token_index`` positions (images in pixel_values order, row-major over B)."""
        is_image = input_ids == self.config.image_token_index
        # The placeholder id may lie outside the vocabulary; its embedding is overwritten anyway.
        embeds = self.lm.embed(input_ids.masked_fill(is_image, 0))
        if pixel_values is None:
            if is_image.any():
                raise ValueError("input_ids contain image tokens but pixel_values is None")
            return embeds
        images = self.image_embeddings(pixel_values).to(embeds.dtype)
        n_slots, n_feats = int(is_image.sum()), images.shape[0] * images.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"input_ids have {n_slots} image tokens (id {self.config.image_token_index}) but "
                f"the {images.shape[0]} image(s) give {n_feats} embeddings ({images.shape[1]} "
                "each): expand each image placeholder to that many tokens"
            )
        return embeds.masked_scatter(is_image[..., None], images)

    # ----------------------------------------------------------------------------- text
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of a full sequence, as ``LlavaForConditionalGeneration(...).logits``.

        Args:
            input_ids: (B, S) int64, image placeholders expanded to n tokens per image.
            pixel_values: (B_img, C, H, W) or None.
            attention_mask: (B, S), 1 for real tokens, 0 for padding (left or right); None
                means all ones. RoPE positions count real tokens only (HF's generate
                convention), so padded rows give the same logits as unpadded ones.

        Returns:
            (B, S, V) logits. Replaces the static KV cache with one of (B, S) slots.
        """
        B, S = input_ids.shape
        mask = _attention_mask(input_ids, attention_mask)
        embeds = self.embed_inputs(input_ids, pixel_values)
        self.lm.setup_cache(B, S, embeds.dtype, embeds.device)
        input_pos = torch.arange(S, device=input_ids.device)
        return self.lm(embeds, input_pos, _positions(mask), mask)

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with the static KV cache.

        Args:
            input_ids: (B, S) int64, left-padded, image placeholders expanded.
            pixel_values: (B_img, C, H, W) or None.
            max_new_tokens: number of tokens to generate at most.
            attention_mask: (B, S), 0 on the left padding; None means all ones.
            eos_token_id: stop tokens; None uses the config's.
            pad_token_id: written after a sample's eos; None uses the config's (else eos, else 0).

        Returns:
            (B, T) int64 new tokens only, T <= max_new_tokens: a sample stops at its first eos
            (kept) and is padded after it; decoding ends when every sample has stopped.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        text = self.config.text
        eos = text.eos_token_ids if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
        if pad_token_id is None:
            pad_token_id = text.pad_token_id
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if len(eos) else 0
        B, S = input_ids.shape
        device = input_ids.device
        mask = _attention_mask(input_ids, attention_mask)
        if not bool(mask[:, -1].all()):
            raise ValueError("generate_ids needs left padding: attention_mask[:, -1] must be 1")

        # Prefill: the whole prompt in slots 0..S-1, logits of its last token only.
        embeds = self.embed_inputs(input_ids, pixel_values)
        self.lm.setup_cache(B, S + max_new_tokens, embeds.dtype, embeds.device)
        key_mask = torch.zeros(B, S + max_new_tokens, dtype=torch.bool, device=device)
        key_mask[:, :S] = mask
        positions = _positions(mask)
        logits = self.lm(embeds, torch.arange(S, device=device), positions, key_mask, True)
        next_pos = positions[:, -1:] + 1

        eos = eos.to(device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            token = token.masked_fill(done, pad_token_id)
            out.append(token)
            done |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            # Decode: one token per sample at slot S + step.
            slot = S + step
            key_mask[:, slot] = True
            input_pos = torch.tensor([slot], device=device)
            logits = self.lm(self.lm.embed(token[:, None]), input_pos, next_pos, key_mask)
            next_pos = next_pos + 1
        return torch.stack(out, dim=1)

    # ----------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(
        cls,
        path: str | PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> VLM:
        """Load an HF-format LLaVA checkpoint directory (config.json + safetensors), or
        tokengine's format: the same plus ``tokengine_config.json`` and the reducer's weights.

        Both HF key layouts are read (see :mod:`tokengine.models.loading`); weights are cast
        to ``dtype`` and placed on ``device`` without a random initialisation first.
        """
        config = loading.read_config(path)
        fusion = loading.read_tokengine_config(path).get("reducer")
        with torch.device("meta"):
            model = cls(config)
            if fusion is not None:  # tokengine's own format: trained fusion reducer weights
                model.reducer = FusionReducer(FusionConfig(**fusion))
        state = loading.read_weights(path, model.state_dict(), dtype=dtype, device=device)
        model.load_state_dict(state, assign=True)
        model.image_processor = ImageProcessor.from_pretrained(path, config.vision.image_size)
        model.tokenizer = loading.read_tokenizer(path)
        return model.eval()

    def save_pretrained(self, path: str | PathLike) -> None:
        """Write config.json, model.safetensors in the Hub's LLaVA layout,
        preprocessor_config.json and (if set) tokenizer.json, readable by
        ``from_pretrained`` and by ``LlavaForConditionalGeneration`` (which initialises the
        vision layers this model skips at random; LLaVA never uses them)."""
        loading.write_checkpoint(path, self.config, self.state_dict())
        if isinstance(self.reducer, FusionReducer):
            loading.write_tokengine_config(path, {"reducer": self.reducer.config.to_dict()})
        (Path(path) / PREPROCESSOR_FILE).write_text(
            json.dumps(self.image_processor.to_dict(), indent=2) + "\n"
        )
        if self.tokenizer is not None:
            self.tokenizer.save(str(Path(path) / loading.TOKENIZER_FILE))


def _attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, S) bool mask of real tokens; validates the shape."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, S), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(device=input_ids.device, dtype=torch.bool)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, S) int64: the index of each token among its row's real tokens."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
