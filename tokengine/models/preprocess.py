"""CLIP image preprocessing with Pillow and numpy (HF ``CLIPImageProcessor``, PIL backend).

resize (shortest side to ``size``, bicubic) -> centre crop ``crop_size`` -> x / 255 ->
(x - mean) / std, giving float32 (3, H, W) per image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"

ImageInput = Image.Image | np.ndarray | str | PathLike


@dataclass(frozen=True)
class ImageProcessor:
    """CLIP preprocessing.

    ``size`` is the shortest-edge target, (height, width) for a plain resize, or None for no
    resize; ``crop_size`` is (height, width) or None for no crop; ``resample`` is a PIL
    resampling filter (3 = bicubic).
    """

    size: int | tuple[int, int] | None = 336
    crop_size: tuple[int, int] | None = (336, 336)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def for_size(cls, image_size: int) -> ImageProcessor:
        """CLIP defaults for a vision tower of ``image_size`` pixels."""
        return cls(size=image_size, crop_size=(image_size, image_size))

    @classmethod
    def from_pretrained(cls, path: str | PathLike, image_size: int = 336) -> ImageProcessor:
        """Read ``path/preprocessor_config.json`` (HF CLIPImageProcessor format) when present,
        else CLIP defaults at ``image_size``."""
        file = Path(path) / PREPROCESSOR_FILE
        if not file.is_file():
            return cls.for_size(image_size)
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{file} is not a valid CLIP preprocessor config: {e!r}") from e

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessor:
        """From an HF image-processor dict (``size``/``crop_size`` as ints or dicts)."""
        size = d.get("size", 336)
        if isinstance(size, dict):
            size = size["shortest_edge"] if "shortest_edge" in size else _hw(size)
        crop = _hw(d.get("crop_size", size)) if d.get("do_center_crop", True) else None
        return cls(
            size=size if d.get("do_resize", True) else None,
            crop_size=crop,
            mean=tuple(d.get("image_mean", CLIP_MEAN)) if d.get("do_normalize", True) else (0,) * 3,
            std=tuple(d.get("image_std", CLIP_STD)) if d.get("do_normalize", True) else (1,) * 3,
            rescale_factor=d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else 1.0,
            resample=d.get("resample", Image.Resampling.BICUBIC),
        )

    def to_dict(self) -> dict[str, Any]:
        """The HF ``preprocessor_config.json`` form (read back by ``from_dict``)."""
        size = (
            {"shortest_edge": self.size}
            if isinstance(self.size, int)
            else {"height": self.size[0], "width": self.size[1]}
            if self.size is not None
            else None
        )
        crop = self.crop_size
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.size is not None,
            "size": size,
            "do_center_crop": crop is not None,
            "crop_size": None if crop is None else {"height": crop[0], "width": crop[1]},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": int(self.resample),
            "do_convert_rgb": True,
        }

    def __call__(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """One image or a list -> pixel_values (B, 3, H, W) float32.

        Accepts PIL images, (H, W, 3) uint8 arrays and file paths. TypeError for anything
        else, FileNotFoundError / ValueError for a missing / unreadable file.
        """
        if not isinstance(images, list):
            images = [images]
        return torch.from_numpy(np.stack([self.process(_to_pil(im)) for im in images]))

    def process(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image -> (3, H, W) float32."""
        w, h = image.size
        if self.size is None:
            new_w, new_h = w, h
        elif isinstance(self.size, int):
            # Shortest side to `size`, the other truncated (as transformers does).
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = self.size
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        x = np.asarray(image)
        if self.crop_size is not None:
            x = _center_crop(x, self.crop_size)
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_images(
    images: ImageInput | list[ImageInput], processor: ImageProcessor
) -> torch.Tensor:
    """``processor(images)``: pixel_values (B, 3, H, W) float32."""
    return processor(images)


def _hw(size: int | dict[str, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    return (size["height"], size["width"])


def _center_crop(x: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """(H, W, C) -> (ch, cw, C) around the centre, zero-padding an image smaller than crop."""
    ch, cw = crop
    h, w = x.shape[:2]
    if h < ch or w < cw:
        padded = np.zeros((max(h, ch), max(w, cw), x.shape[2]), x.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top : top + h, left : left + w] = x
        x, h, w = padded, *padded.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top : top + ch, left : left + cw]


def _to_pil(image: ImageInput) -> Image.Image:
    """An RGB PIL image from any accepted input; transparency is composited onto white."""
    if isinstance(image, str | PathLike):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        try:
            with Image.open(path) as f:
                f.load()
                image = f.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image file {path}: {e}") from e
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise TypeError(
                f"image arrays must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
            )
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"image must be a PIL image, an (H, W, 3) uint8 array or a file path, "
            f"got {type(image).__name__}"
        )
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
