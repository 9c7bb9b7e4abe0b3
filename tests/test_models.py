"""tokengine.models against transformers' LlavaForConditionalGeneration on tiny random models."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from tokengine.models import VLM, ImageProcessor, VLMConfig

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

IMAGE_TOKEN = 199
VOCAB = 200
EOS, PAD = 2, 0

VISION = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=48,
    patch_size=8,
)
TEXT = dict(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)

# name -> (vision overrides, text overrides, top-level overrides)
CONFIGS = {
    "default": ({}, {}, {}),
    "gqa-full-layer1": (
        dict(num_hidden_layers=2, image_size=64),
        dict(num_key_value_heads=2),
        dict(vision_feature_layer=1, vision_feature_select_strategy="full"),
    ),
    "llama3-last-layer": (
        dict(num_hidden_layers=4, image_size=56),
        dict(num_key_value_heads=1, rope_parameters=LLAMA3_ROPE),
        dict(vision_feature_layer=-1),
    ),
    "tied-linear-rope": (
        {},
        dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="linear", factor=2.0)),
        dict(tie_word_embeddings=True, multimodal_projector_bias=False),
    ),
}


def hf_config(name: str):
    v, t, top = CONFIGS[name]
    return transformers.LlavaConfig(
        vision_config={**VISION, **v},
        text_config={**TEXT, **t},
        image_token_index=IMAGE_TOKEN,
        **top,
    )


def hf_model(name: str):
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(hf_config(name)).eval()
    # HF's init (std 0.02) gives near-uniform logits and degenerate, repetitive greedy output;
    # fan-in scaled weights and norms near 1 make every layer and position matter.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p)) if n.endswith("weight") else p.normal_(
                    0, 0.1
                )
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.dim() == 1 or "embed" in n:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
    return model


def n_image_tokens(cfg) -> int:
    v = cfg.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + (cfg.vision_feature_select_strategy == "full")


def prompt(cfg, n_text: int, seed: int, n_before: int = 2) -> torch.Tensor:
    """(n_text + N,) ids: n_before text tokens, the expanded image, then the rest."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB - 1, (n_text,), generator=g)
    image = torch.full((n_image_tokens(cfg),), IMAGE_TOKEN)
    return torch.cat([text[:n_before], image, text[n_before:]])


def pixels(cfg, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision_config.image_size
    return torch.randn(batch, 3, s, s, generator=g)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    waits make each small op ~1000x slower (15 ms instead of 10 us per attention call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (HF model, checkpoint directory written by save_pretrained)."""
    out = {}
    for name in CONFIGS:
        model = hf_model(name)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(saved, name):
    hf, path = saved[name]
    ours = VLM.from_pretrained(path)
    ids = torch.stack([prompt(hf.config, 7, seed) for seed in (1, 2)])
    pv = pixels(hf.config, 2)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pv).logits
        got = ours(ids, pv)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_matches_hf(saved, name, seed):
    hf, path = saved[name]
    ours = VLM.from_pretrained(path)
    ids = prompt(hf.config, 6, seed=seed)[None]
    pv = pixels(hf.config, 1, seed=seed)
    expected = hf.generate(
        input_ids=ids,
        pixel_values=pv,
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )[:, ids.shape[1] :]
    got = ours.generate_ids(ids, pv, 16, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got, expected)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_on_cuda(saved, name, dtype):
    """On CUDA, in each dtype, our logits are as close to the float64 truth as HF's own model
    on the same device and dtype (at most twice its error: accumulation orders differ)."""
    hf, path = saved[name]
    ids = torch.stack([prompt(hf.config, 7, seed) for seed in (1, 2)])
    pv = pixels(hf.config, 2)
    with torch.no_grad():
        truth = copy.deepcopy(hf).double()(input_ids=ids, pixel_values=pv.double()).logits
        hf_dev = copy.deepcopy(hf).to("cuda", dtype)
        theirs = hf_dev(input_ids=ids.cuda(), pixel_values=pv.to("cuda", dtype)).logits
        ours = VLM.from_pretrained(path, dtype=dtype, device="cuda")
        got = ours(ids.cuda(), pv.to("cuda", dtype))
    assert got.dtype == dtype and got.shape == truth.shape
    assert rel_err(got.cpu(), truth) <= 2 * rel_err(theirs.cpu(), truth) + 1e-6


@needs_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_matches_hf_on_cuda(saved, name):
    hf, path = saved[name]
    ids = prompt(hf.config, 6, seed=3)[None].cuda()
    pv = pixels(hf.config, 1, seed=3).cuda()
    hf_dev = copy.deepcopy(hf).cuda()
    kwargs = dict(max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    expected = hf_dev.generate(input_ids=ids, pixel_values=pv, **kwargs)[:, ids.shape[1] :]
    ours = VLM.from_pretrained(path, device="cuda")
    got = ours.generate_ids(ids, pv, 16, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got, expected)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["gqa-full-layer1", "llama3-last-layer"])
def test_batch_invariance(saved, name):
    """A left-padded batch of 8 prompts of different lengths gives each prompt's tokens alone,
    and HF's batched generate agrees, with and without stopping at eos."""
    hf, path = saved[name]
    ours = VLM.from_pretrained(path)
    prompts = [prompt(hf.config, n, 10 + n, min(n, 2)) for n in (3, 9, 5, 12, 1, 7, 20, 4)]
    pv = pixels(hf.config, 8, seed=6)
    ids, mask = left_pad(prompts)
    alone = [
        ours.generate_ids(p[None], pv[i : i + 1], 16, eos_token_id=[])
        for i, p in enumerate(prompts)
    ]
    batched = ours.generate_ids(ids, pv, 16, attention_mask=mask, eos_token_id=[])
    assert torch.equal(batched, torch.cat(alone))
    kwargs = dict(input_ids=ids, pixel_values=pv, attention_mask=mask, do_sample=False)
    never = VOCAB + 100  # an eos id no step can produce: HF then runs the full length
    expected = hf.generate(**kwargs, max_new_tokens=16, eos_token_id=never, pad_token_id=PAD)
    assert torch.equal(batched, expected[:, ids.shape[1] :])

    stopped = ours.generate_ids(
        ids, pv, 16, attention_mask=mask, eos_token_id=EOS, pad_token_id=PAD
    )
    expected = hf.generate(**kwargs, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(stopped, expected[:, ids.shape[1] :])
    if name == "llama3-last-layer":  # this model emits eos mid-answer, so stopping is tested
        assert (batched[:, :-1] == EOS).any()


def test_padded_forward_matches_hf(saved):
    """With left padding, logits of real tokens match HF given the same position ids."""
    hf, path = saved["default"]
    ours = VLM.from_pretrained(path)
    a, b = prompt(hf.config, 4, seed=7), prompt(hf.config, 9, seed=8)
    ids = torch.stack([torch.cat([torch.full((len(b) - len(a),), PAD), a]), b])
    mask = (torch.arange(len(b)) >= len(b) - len(a)).long()[None].repeat(2, 1)
    mask[1] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    pv = pixels(hf.config, 2, seed=9)
    with torch.no_grad():
        expected = hf(ids, pv, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, pv, attention_mask=mask)
    real = mask.bool()
    assert rel_err(got[real], expected[real]) < 1e-4


def test_sharded_checkpoint(saved, tmp_path):
    hf, _ = saved["default"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids, pv = prompt(hf.config, 5, seed=1)[None], pixels(hf.config, 1)
    with torch.no_grad():
        assert rel_err(VLM.from_pretrained(tmp_path)(ids, pv), hf(ids, pv).logits) < 1e-4


# Renames from transformers 5's in-memory names (model.vision_tower.embeddings...) to the
# other layouts HF has used for LLaVA checkpoints.
LAYOUTS = {
    "transformers-5": {},
    "transformers-4.52": {"model.vision_tower.": "model.vision_tower.vision_model."},
    "hub": {
        "model.vision_tower.": "vision_tower.vision_model.",
        "model.multi_modal_projector.": "multi_modal_projector.",
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    },
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_key_layouts(saved, tmp_path, layout):
    hf, path = saved["llama3-last-layer"]

    def rename(key: str) -> str:
        for new, old in LAYOUTS[layout].items():
            if key.startswith(new):
                return old + key[len(new) :]
        return key

    state = {rename(k): v.contiguous() for k, v in hf.state_dict().items()}
    safetensors_torch.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ids, pv = prompt(hf.config, 5, seed=1)[None], pixels(hf.config, 1)
    with torch.no_grad():
        assert rel_err(VLM.from_pretrained(tmp_path)(ids, pv), hf(ids, pv).logits) < 1e-4


def test_save_pretrained_roundtrip(saved, tmp_path):
    """Our checkpoint reloads in tokengine and in transformers with the same logits."""
    hf, path = saved["tied-linear-rope"]
    ours = VLM.from_pretrained(path)
    assert ours.tokenizer is None and ours.image_processor == ImageProcessor.for_size(48)
    ours.tokenizer = Tokenizer(WordLevel({"<unk>": 0, "a": 1, "<image>": 2}, unk_token="<unk>"))
    ours.image_processor = ImageProcessor(size=50, crop_size=(48, 48), mean=(0.5, 0.5, 0.5))
    ours.save_pretrained(tmp_path)
    loaded = VLM.from_pretrained(tmp_path)
    assert loaded.image_processor == ours.image_processor
    assert loaded.tokenizer.token_to_id("<image>") == 2
    ids, pv = prompt(hf.config, 5, seed=2)[None], pixels(hf.config, 1)
    with torch.no_grad():
        expected = ours(ids, pv)
        assert torch.equal(loaded(ids, pv), expected)
        hf2 = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
        assert rel_err(hf2(ids, pv).logits, expected) < 1e-4


def test_bfloat16_load_runs(saved):
    _, path = saved["default"]
    ours = VLM.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.lm.embed_tokens.weight.dtype == torch.bfloat16
    cfg = ours.config
    ids = torch.tensor([[5, *[IMAGE_TOKEN] * cfg.num_image_tokens, 6]])
    pv = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    out = ours.generate_ids(ids, pv, 4, eos_token_id=[])
    assert out.shape == (1, 4)


# ----------------------------------------------------------------------------- config
def test_config_parses_transformers_4_rope_fields():
    d = hf_config("default").to_dict()
    d["text_config"].pop("rope_parameters", None)
    d["text_config"]["rope_theta"] = 500000.0
    d["text_config"]["rope_scaling"] = {"type": "linear", "factor": 4.0}
    cfg = VLMConfig.from_hf_dict(d)
    assert cfg.text.rope_theta == 500000.0
    assert cfg.text.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_known_shapes():
    cfg = VLMConfig.llava_1_5_7b()
    assert cfg.num_image_tokens == 576
    assert (cfg.vision.hidden_size, cfg.text.hidden_size, cfg.text.num_attention_heads) == (
        1024,
        4096,
        32,
    )
    assert cfg.feature_layer_index == 23
    with torch.device("meta"):
        model = VLM(cfg)
    assert len(model.vision.layers) == 23


def test_config_rejects_unsupported_rope():
    d = hf_config("default").to_dict()
    d["text_config"]["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0}
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        VLMConfig.from_hf_dict(d)


# ----------------------------------------------------------------------------- errors
def write_config(path, d) -> None:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(d))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VLM.from_pretrained(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLM.from_pretrained(tmp_path)


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_type", "qwen2_vl"),
        ("vision_config", "siglip_vision_model"),
        ("text_config", "mistral"),
    ],
)
def test_unsupported_model_type(tmp_path, field, value):
    d = hf_config("default").to_dict()
    if field == "model_type":
        d["model_type"] = value
    else:
        d[field]["model_type"] = value
    write_config(tmp_path, d)
    with pytest.raises(ValueError, match=f"model_type '{value}'.*supported"):
        VLM.from_pretrained(tmp_path)


def test_missing_weights(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved["default"][1] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VLM.from_pretrained(tmp_path)


def test_missing_shard(saved, tmp_path):
    saved["default"][0].save_pretrained(tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00001"):
        VLM.from_pretrained(tmp_path)


def test_truncated_safetensors(saved, tmp_path):
    src = saved["default"][1]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors"):
        VLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("problem", ["missing", "misshaped"])
def test_bad_tensor(saved, tmp_path, problem):
    src = saved["default"][1]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    state = safetensors_torch.load_file(src / "model.safetensors")
    key = next(k for k in state if k.endswith("layers.1.mlp.up_proj.weight"))
    if problem == "missing":
        del state[key]
    else:
        state[key] = state[key][:-1]
    safetensors_torch.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    match = "missing 1 tensor.*layers.1.mlp.up_proj" if problem == "missing" else f"{key} has shape"
    with pytest.raises(ValueError, match=match):
        VLM.from_pretrained(tmp_path)


def test_image_token_count_mismatch(saved):
    hf, path = saved["default"]
    ours = VLM.from_pretrained(path)
    ids = prompt(hf.config, 4, seed=1)[None]
    ids = torch.cat([ids[:, :2], ids[:, 3:]], dim=1)  # one image token fewer
    with pytest.raises(ValueError, match="image tokens"):
        ours(ids, pixels(hf.config, 1))


# ----------------------------------------------------------------------------- images
def random_images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = [(60, 80), (97, 53), (48, 48), (31, 70), (200, 150)][:n]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def test_preprocess_matches_clip_image_processor():
    """Against transformers' PIL backend (its default needs torchvision); 0.0 diff seen."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    ours = ImageProcessor.from_dict(hf.to_dict())
    images = random_images(5)
    rgba = Image.fromarray(np.dstack([images[0], images[0][..., 0]]), "RGBA")
    # Transparency goes over white, as transformers 5.24 does (5.17 dropped the alpha channel),
    # so HF is handed the composited image: the same pixels under either version.
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    pairs = [(image, image) for image in images]
    pairs += [(Image.fromarray(images[1]).convert("L"),) * 2, (rgba, on_white)]
    for image, hf_input in pairs:
        expected = torch.as_tensor(np.asarray(hf(hf_input, return_tensors="np")["pixel_values"]))
        got = ours(image)
        assert got.shape == expected.shape == (1, 3, 48, 48)
        assert (got - expected).abs().max().item() < 1e-5


def test_preprocess_inputs(tmp_path):
    from PIL import Image

    array = random_images(1)[0]
    file = tmp_path / "a.png"
    Image.fromarray(array).save(file)
    proc = ImageProcessor.for_size(32)
    a = proc([array, Image.fromarray(array), file, str(file)])
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert all(torch.equal(a[0], a[i]) for i in range(1, 4))


def test_preprocessor_config_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 40}, "crop_size": {"height": 40, "width": 40}})
    )
    assert ImageProcessor.from_pretrained(tmp_path).crop_size == (40, 40)
    assert ImageProcessor.from_pretrained(tmp_path / "none", image_size=24).size == 24


@pytest.mark.parametrize("bad", [42, torch.zeros(3, 8, 8), np.zeros((8, 8, 3), np.float32)])
def test_not_an_image(bad):
    with pytest.raises(TypeError, match="image"):
        ImageProcessor.for_size(32)(bad)


def test_unreadable_image_file(tmp_path):
    file = tmp_path / "broken.jpg"
    file.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        ImageProcessor.for_size(32)(file)
    with pytest.raises(FileNotFoundError):
        ImageProcessor.for_size(32)(tmp_path / "missing.jpg")
