"""Lean LLaVA-family model code: CLIP ViT, Llama with a static KV cache, HF checkpoint I/O."""

from tokengine.models.config import KNOWN_MODELS, LMConfig, VisionConfig, VLMConfig
from tokengine.models.preprocess import ImageProcessor
from tokengine.models.vlm import VLM

__all__ = ["KNOWN_MODELS", "ImageProcessor", "LMConfig", "VLM", "VLMConfig", "VisionConfig"]
