"""Reading and writing HF-format LLaVA checkpoints: config.json + safetensors.

Parameter names are mapped by prefix. HF has used several layouts for the same weights:

=========================================  ========================================  ===========
Hub / transformers < 4.52 (and 5.x saves)  transformers 4.52+ in memory (5.x: no     tokengine
                                           ``vision_model.``)
=========================================  ========================================  ===========
vision_tower[.vision_model].…              model.vision_tower[.vision_model].…       vision.…
multi_modal_projector.…                    model.multi_modal_projector.…             projector.…
language_model.model.…                     model.language_model.…                    lm.…
language_model.lm_head.weight              lm_head.weight                            lm.lm_head.…
=========================================  ========================================  ===========

with the vision ``embeddings.`` and ``encoder.`` levels flattened. All of them are read;
``write_checkpoint`` writes the Hub layout (what llava-hf/llava-1.5-7b-hf holds), which every
transformers version loads. Checkpoint tensors the model does not use (vision layers after the
feature layer, ``post_layernorm``, a tied ``lm_head``) are skipped; names outside these
prefixes map to themselves.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from tokengine.models.config import VLMConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENGINE_FILE = "tokengine_config.json"  # tokengine's additions (the fusion reducer's shape)

# (HF prefix, local prefix); the first match wins, so longer roots come first.
_VISION_ROOTS = (
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
)
_LOAD_PREFIXES = [
    (root + level, "vision.") for root in _VISION_ROOTS for level in ("embeddings.", "encoder.", "")
] + [
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.language_model.", "lm."),
    ("language_model.model.", "lm."),
    ("lm_head.", "lm.lm_head."),
    ("language_model.lm_head.", "lm.lm_head."),
]
_VISION_EMBEDDINGS = ("class_embedding", "patch_embedding.", "position_embedding.")


def hf_to_local(name: str) -> str:
    """Our parameter name for an HF checkpoint name of any layout."""
    for src, dst in _LOAD_PREFIXES:
        if name.startswith(src):
            return dst + name[len(src) :]
    return name


def local_to_hf(name: str) -> str:
    """The Hub-layout checkpoint name of one of our parameters."""
    if name.startswith("vision."):
        rest = name[len("vision.") :]
        if rest.startswith(_VISION_EMBEDDINGS):
            rest = "embeddings." + rest
        elif rest.startswith("layers."):
            rest = "encoder." + rest
        return "vision_tower.vision_model." + rest
    if name.startswith("projector."):
        return "multi_modal_projector." + name[len("projector.") :]
    if name.startswith("lm.lm_head."):
        return "language_model." + name[len("lm.") :]
    if name.startswith("lm."):
        return "language_model.model." + name[len("lm.") :]
    return name


def read_config(path: str | PathLike) -> VLMConfig:
    """Parse ``path/config.json``. FileNotFoundError for a missing directory or file,
    ValueError for invalid JSON or an unsupported model (naming the file)."""
    path = _model_dir(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not an HF model directory")
    d = _read_json_object(file)
    try:
        return VLMConfig.from_hf_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from e


def weight_files(path: str | PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``. FileNotFoundError naming what is missing."""
    path = _model_dir(path)
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.safetensors")
        )
        found = f" (found {others}; only {WEIGHTS_FILE} or sharded safetensors are read)"
        raise FileNotFoundError(
            f"no weights in {path}: expected {WEIGHTS_FILE} or {INDEX_FILE}"
            + (found if others else "")
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index ({e!r})") from e
    files = [path / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards missing from {path}: {missing}")
    return files


def read_weights(
    path: str | PathLike,
    expected: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Load the tensors named in ``expected`` (our names -> tensors of the expected shapes,
    e.g. a meta-device ``state_dict()``) from the checkpoint at ``path``, cast to ``dtype``
    on ``device``. ValueError for a corrupt file, a missing or mis-shaped tensor."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    name = hf_to_local(key)
                    if name not in expected:
                        continue
                    tensor = f.get_tensor(key)
                    if tensor.shape != expected[name].shape:
                        raise ValueError(
                            f"{file}: tensor {key} has shape {tuple(tensor.shape)}, the config "
                            f"needs {tuple(expected[name].shape)}"
                        )
                    state[name] = tensor.to(dtype)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a valid safetensors file (truncated?): {e}") from e
    missing = [local_to_hf(name) for name in expected if name not in state]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        raise ValueError(f"checkpoint {path} is missing {len(missing)} tensor(s): {shown}")
    return state


def read_tokenizer(path: str | PathLike) -> Tokenizer | None:
    """``path/tokenizer.json`` as a ``tokenizers.Tokenizer``, None when there is none."""
    file = _model_dir(path) / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception on a malformed file
        raise ValueError(f"{file} is not a valid tokenizers file: {e}") from e


def read_tokengine_config(path: str | PathLike) -> dict:
    """``path/tokengine_config.json`` ({} when absent: a plain HF checkpoint)."""
    file = _model_dir(path) / TOKENGINE_FILE
    return _read_json_object(file) if file.is_file() else {}


def _read_json_object(file: Path) -> dict:
    """A JSON file holding an object; ValueError naming the file otherwise."""
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(d).__name__}")
    return d


def write_tokengine_config(path: str | PathLike, d: dict) -> None:
    (Path(path) / TOKENGINE_FILE).write_text(json.dumps(d, indent=2) + "\n")


def write_checkpoint(
    path: str | PathLike, config: VLMConfig, state_dict: dict[str, torch.Tensor]
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (Hub-layout names) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    tensors = {local_to_hf(k): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # transformers refuses safetensors files without this metadata.
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})


def _model_dir(path: str | PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    return path
