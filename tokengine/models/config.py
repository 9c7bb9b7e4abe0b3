"""Model configs: CLIP vision tower, Llama decoder, and their LLaVA composition.

``VLMConfig.from_hf_dict`` reads an HF LLaVA ``config.json`` (transformers 4.x and 5.x), and
``KNOWN_MODELS`` holds the shapes of real checkpoints for benchmarks with random weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tokengine.models.activations import ACTIVATIONS

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class VisionConfig:
    """CLIP ViT (``clip_vision_model``). Defaults are LLaVA's CLIP ViT-L/14 at 336 px."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class LMConfig:
    """Llama decoder. Defaults are transformers' ``LlamaConfig`` defaults (Llama-2-7B shapes).

    ``head_dim`` None means hidden_size // num_attention_heads; ``num_key_value_heads`` None
    means num_attention_heads (no GQA). ``rope_scaling`` is None (plain RoPE) or a dict with
    ``rope_type`` "linear" (``factor``) or "llama3" (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (Llama 3 configs give several)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else self.eos_token_id


@dataclass
class VLMConfig:
    """LLaVA: vision tower -> selected hidden layer -> projector -> Llama decoder.

    ``vision_feature_layer`` indexes HF's ``hidden_states`` tuple (entry 0 is the embeddings
    after ``pre_layrnorm``, entry i the output of encoder layer i), so -2 is the penultimate
    layer. ``vision_feature_select_strategy`` "default" drops the CLS token, "full" keeps it.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: LMConfig = field(default_factory=LMConfig)
    image_token_index: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_layer must be a single int, got {self.vision_feature_layer!r} "
                "(concatenating several layers is not supported)"
            )
        n = self.vision.num_hidden_layers + 1
        if not -n <= self.vision_feature_layer < n:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} is out of range for a vision "
                f"tower with {self.vision.num_hidden_layers} layers"
            )
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        _check_activation("projector_hidden_act", self.projector_hidden_act)
        _check_activation("vision_config.hidden_act", self.vision.hidden_act)
        _check_activation("text_config.hidden_act", self.text.hidden_act)

    @property
    def feature_layer_index(self) -> int:
        """Non-negative ``vision_feature_layer``: the number of encoder layers LLaVA runs."""
        return self.vision_feature_layer % (self.vision.num_hidden_layers + 1)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image before any reduction (576 for LLaVA-1.5)."""
        cls = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + cls

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VLMConfig:
        """Parse an HF ``LlavaConfig`` dict (the contents of a LLaVA ``config.json``).

        Missing fields take transformers' defaults. Raises ValueError naming the field for an
        unsupported ``model_type`` (anything but llava / clip_vision_model / llama) or option.
        """
        _expect_model_type("model_type", d.get("model_type"), "llava")
        v = d.get("vision_config")
        # transformers builds LLaVA's default CLIP-L/336 when vision_config is absent.
        v = asdict(VisionConfig()) if v is None else v
        t = d.get("text_config") or {}
        vision_type = v.get("model_type", "clip_vision_model")
        _expect_model_type("vision_config.model_type", vision_type, "clip_vision_model")
        _expect_model_type("text_config.model_type", t.get("model_type", "llama"), "llama")
        vision = VisionConfig(
            **{k: v[k] for k in VisionConfig.__dataclass_fields__ if v.get(k) is not None}
        )
        text_fields = {
            k: t[k]
            for k in LMConfig.__dataclass_fields__
            if k not in ("rope_theta", "rope_scaling") and t.get(k) is not None
        }
        text_fields["rope_theta"], text_fields["rope_scaling"] = _hf_rope(t)
        # LLaVA configs may keep these at the top level (pad_token_id in llava-1.5-hf).
        text_fields["tie_word_embeddings"] = bool(
            d.get("tie_word_embeddings") or t.get("tie_word_embeddings")
        )
        if text_fields.get("pad_token_id") is None and d.get("pad_token_id") is not None:
            text_fields["pad_token_id"] = d["pad_token_id"]
        top = {
            k: d[k]
            for k in (
                "image_token_index",
                "vision_feature_layer",
                "vision_feature_select_strategy",
                "projector_hidden_act",
                "multimodal_projector_bias",
            )
            if d.get(k) is not None
        }
        if "image_token_index" not in top and d.get("image_token_id") is not None:
            top["image_token_index"] = d["image_token_id"]
        return cls(vision=vision, text=LMConfig(**text_fields), **top)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF ``LlavaConfig`` dict that transformers (4.x and 5.x) and ``from_hf_dict`` read."""
        text = asdict(self.text)
        if text["rope_scaling"] is None:
            del text["rope_scaling"]
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "vision_config": {"model_type": "clip_vision_model", **asdict(self.vision)},
            "text_config": {"model_type": "llama", **text},
            "image_token_index": self.image_token_index,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.text.tie_word_embeddings,
        }

    @classmethod
    def from_name(cls, name: str) -> VLMConfig:
        """The config of a known checkpoint in ``KNOWN_MODELS`` (shapes only, for benchmarks)."""
        if name not in KNOWN_MODELS:
            raise ValueError(f"unknown model {name!r}; known: {sorted(KNOWN_MODELS)}")
        return cls.from_hf_dict(KNOWN_MODELS[name])

    @classmethod
    def llava_1_5_7b(cls) -> VLMConfig:
        """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (576 tokens) + Vicuna-7B."""
        return cls.from_name("llava-1.5-7b")


def _expect_model_type(field_name: str, value: Any, supported: str) -> None:
    if value != supported:
        raise ValueError(f"unsupported {field_name} {value!r}; supported: {supported!r}")


def _check_activation(field_name: str, name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {field_name} {name!r}; supported: {sorted(ACTIVATIONS)}")


def _hf_rope(t: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a text config of either transformers generation.

    transformers 5 nests everything in ``rope_parameters`` (with ``rope_theta`` inside);
    4.x has top-level ``rope_theta`` and ``rope_scaling`` (with ``type`` or ``rope_type``).
    """
    params = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or t.get("rope_theta") or 10000.0
    return float(theta), params or None


def _normalise_rope_scaling(
    scaling: dict[str, Any] | None, max_position_embeddings: int
) -> dict[str, Any] | None:
    """Validate RoPE scaling; None for plain RoPE, else a dict with a ``rope_type`` key."""
    if not scaling:
        return None
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    rope_type = scaling.pop("type", None)
    rope_type = scaling.setdefault("rope_type", rope_type or "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"unsupported text_config rope type {rope_type!r}; supported: {list(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    return scaling


# Shapes of real checkpoints, in config.json form, for benchmarks with random weights.
_LLAVA_1_5_7B: dict[str, Any] = {
    "model_type": "llava",
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
    },
    "text_config": {
        "model_type": "llama",
        "vocab_size": 32064,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
}
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": _LLAVA_1_5_7B,
    # the same CLIP tower and projector recipe over Vicuna-13B
    "llava-1.5-13b": {
        **_LLAVA_1_5_7B,
        "text_config": {
            **_LLAVA_1_5_7B["text_config"],
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
        },
    },
}
