"""Engine: every reducer at every N_l, nested fusion queries, batch invariance, clear errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing

from tokengine.engine import Engine
from tokengine.models import VLM, LMConfig, VisionConfig, VLMConfig
from tokengine.models.reducer import (
    FusionConfig,
    FusionReducer,
    recorded_attn_mass,
    sincos_positions,
)

WORDS = [
    "USER",
    ":",
    "ASSISTANT",
    "?",
    "what",
    "colour",
    "is",
    "the",
    "square",
    "how",
    "many",
    "circles",
    "are",
    "there",
    "red",
    "blue",
    "yes",
    "no",
    "left",
    "of",
    "a",
]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TOKEN_COUNTS = [1, 16, 64, 144, 256, 576]
QUESTIONS = [
    "what colour is the square ?",
    "how many circles are there ?",
    "is",
    "red ?",
    "is the square left of the circle ?",
    "what is the colour of a square ?",
    "blue",
    "are there many red circles left of the blue square ?",
]


def tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def vlm() -> VLM:
    """A random model with a 24x24 = 576-token grid (48 px, patch 2) and a fusion reducer."""
    torch.manual_seed(0)
    vocab = len(SPECIAL) + len(WORDS)
    config = VLMConfig(
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=48,
            patch_size=2,
        ),
        text=LMConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_index=4,
        vision_feature_layer=-1,
    )
    model = VLM(config)
    model.reducer = FusionReducer(
        FusionConfig(
            vision_dim=32,
            text_dim=64,
            num_queries=576,
            num_layers=1,
            num_heads=4,
            question_positions=8,
            image_positions=576,
        )
    )
    with torch.no_grad():  # fan-in scaled weights so greedy answers vary with the input
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                # peaky LM attention, so that each answer hangs on particular tokens
                gain = 1.0 if "embed_tokens" in name else 1 / math.sqrt(p.shape[-1])
                gain *= (
                    3.0
                    if name.startswith("lm.") and ("q_proj" in name or "k_proj" in name)
                    else 1.0
                )
                p.normal_(0, gain)
    model.tokenizer = tokenizer()
    return model.eval()


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + i, 56, 3), dtype=np.uint8)) for i in range(n)
    ]


@pytest.mark.parametrize(
    "reducer", ["pool-avg", "pool-max", "pool-question", "fusion", "fusion-noq"]
)
def test_every_reducer_at_every_token_count(vlm, reducer):
    engine = Engine(vlm)
    seen = []
    hook = vlm.lm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        for tokens in TOKEN_COUNTS:
            seen.clear()
            res = engine.generate(
                images(2), QUESTIONS[:2], tokens=tokens, reducer=reducer, max_new_tokens=3
            )
            assert res.image_tokens == [tokens, tokens]
            # the prefill's sequence: the longest text prompt plus exactly N_l image slots
            text_len = max(len(engine._prompt_ids(q, 0)) for q in QUESTIONS[:2])
            assert seen[0] == text_len + tokens
            assert len(res.texts) == 2 and all(len(ids) <= 3 for ids in res.token_ids)
    finally:
        hook.remove()


def test_reducer_none_keeps_all_tokens(vlm):
    res = Engine(vlm).generate(images(1), QUESTIONS[:1], reducer="none", max_new_tokens=2)
    assert res.image_tokens == [576]
    for key in ("vision_ms", "reduce_ms", "prefill_ms", "decode_ms", "peak_memory_mb"):
        assert res.timings[key] >= 0
    assert res.ttft_ms[0] > 0


def test_fusion_uses_the_first_tokens_queries(vlm):
    fusion = vlm.reducer
    image = torch.randn(2, 576, 32)
    question = torch.randn(5, 64)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with torch.no_grad():
        before = fusion(image, 16, question, cu)
        saved = fusion.queries.clone()
        fusion.queries[16:] += 1.0  # queries past N_l must not matter
        assert torch.equal(fusion(image, 16, question, cu), before)
        fusion.queries[15] += 1.0  # the N_l-th query must
        assert not torch.allclose(fusion(image, 16, question, cu), before)
        fusion.queries.copy_(saved)


@pytest.mark.parametrize("positions", [0, 4])
def test_question_positions_make_word_order_matter(positions):
    """Without question positions the queries see the question as a bag of words; with them
    (shared past the last one), swapping two words changes the output, also past it."""
    torch.manual_seed(0)
    cfg = FusionConfig(vision_dim=16, text_dim=8, num_queries=4, num_layers=1, num_heads=2,
                       question_positions=positions)  # fmt: skip
    fusion = FusionReducer(cfg).eval()
    if positions:
        with torch.no_grad():
            fusion.question_pos.normal_()
    image, question = torch.randn(2, 9, 16), torch.randn(11, 8)
    cu = torch.tensor([0, 5, 11], dtype=torch.int32)
    swapped = question[[0, 1, 2, 3, 4, 5, 6, 8, 7, 9, 10]]  # sample 1, its words 2 and 3
    late = question[[0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9]]  # sample 1, words 4 and 5 (both >= 4)
    with torch.no_grad():
        out, out_swapped, out_late = (fusion(image, 4, q, cu) for q in (question, swapped, late))
    assert torch.equal(out[0], out_swapped[0])  # sample 0 untouched
    assert torch.allclose(out[1], out_late[1], atol=1e-6)  # positions past the last are shared
    assert torch.allclose(out[1], out_swapped[1], atol=1e-6) == (positions == 0)


@pytest.mark.parametrize("select_image", [False, True])
def test_select_image_tokens_are_mixes_of_image_tokens(select_image):
    """With ``select_image`` an output token is (per head) a weighted mix of the image tokens:
    when every image token is the same vector, neither the question nor the queries can change
    the output. Without it the queries' states are the output, and the question changes them."""
    torch.manual_seed(0)
    cfg = FusionConfig(vision_dim=16, text_dim=8, num_queries=4, num_layers=2, num_heads=2,
                       question_positions=3, select_image=select_image)  # fmt: skip
    fusion = FusionReducer(cfg).eval()
    image = torch.randn(1, 1, 16).expand(2, 9, 16)  # one vector at all 9 places, 2 samples
    cu = torch.tensor([0, 5, 11], dtype=torch.int32)
    with torch.no_grad():
        out = fusion(image, 3, torch.randn(11, 8), cu)
        other = fusion(image, 3, torch.randn(11, 8), cu)  # other questions
        fusion.queries.add_(torch.randn_like(fusion.queries))  # other queries
        moved = fusion(image, 3, torch.randn(11, 8), cu)
    assert torch.allclose(out, other, atol=1e-5) == select_image
    assert torch.allclose(out, moved, atol=1e-5) == select_image
    assert torch.allclose(out[:, 0], out[:, 2], atol=1e-5) == select_image
    varied = torch.randn(2, 9, 16)  # with varied image tokens the question picks among them
    with torch.no_grad():
        a, b = (fusion(varied, 3, torch.randn(11, 8), cu) for _ in range(2))
    assert not torch.allclose(a, b, atol=1e-3)


def test_sincos_positions_code_grid_rows_and_columns():
    pos = sincos_positions(36, 8)  # a 6x6 grid: channels 0-3 the row, 4-7 the column
    assert pos.shape == (36, 8) and pos.abs().max() <= 1
    row, col = torch.arange(36) // 6, torch.arange(36) % 6
    for i in range(36):
        assert torch.equal(pos[row == row[i], :4], pos[i, :4].expand(6, 4))
        assert torch.equal(pos[col == col[i], 4:], pos[i, 4:].expand(6, 4))
    distances = torch.cdist(pos, pos) + torch.eye(36)
    assert distances.min() > 0.1  # every position has its own code
    line = sincos_positions(7, 6)  # not a square: 1-D
    assert line.shape == (7, 6) and (torch.cdist(line, line) + torch.eye(7)).min() > 0.1
    with pytest.raises(ValueError, match="dim must be a multiple of 4"):
        sincos_positions(36, 6)


@pytest.mark.parametrize("positions", [0, 9])
def test_image_positions_tell_the_queries_where_tokens_are(positions):
    """Without image positions the reducer cannot see where a token is (shuffling the image
    tokens changes nothing); with them it can, from initialisation on, and they weigh the same
    whatever the scale of the image tokens (a ViT's residual stream can be large)."""
    torch.manual_seed(0)
    cfg = FusionConfig(vision_dim=16, text_dim=8, num_queries=4, num_layers=1, num_heads=2,
                       image_positions=positions)  # fmt: skip
    fusion = FusionReducer(cfg).eval()
    image = torch.randn(1, 9, 16) * 50  # a residual stream far larger than the codes
    shuffled = image[:, torch.randperm(9)]
    with torch.no_grad():
        out, out_shuffled, out_small = (fusion(x, 4) for x in (image, shuffled, image / 50))
    moved = (out - out_shuffled).abs().max()
    assert (moved < 1e-5) if positions == 0 else (moved > 1e-2)
    torch.testing.assert_close(out_small, out, atol=1e-4, rtol=0)


def test_image_positions_need_their_token_count(vlm):
    with pytest.raises(ValueError, match="image must have 576 tokens"):
        vlm.reducer(torch.randn(1, 144, 32), 4)


@pytest.mark.parametrize("reducer,tokens", [("fusion", 64), ("pool-question", 16), ("none", None)])
def test_answers_do_not_depend_on_batch_size(vlm, reducer, tokens):
    engine = Engine(vlm)
    imgs = images(8, seed=1)
    one = engine.generate(
        imgs, QUESTIONS, tokens=tokens, reducer=reducer, max_new_tokens=6, batch_size=1
    )
    eight = engine.generate(
        imgs, QUESTIONS, tokens=tokens, reducer=reducer, max_new_tokens=6, batch_size=8
    )
    assert one.token_ids == eight.token_ids
    assert one.texts == eight.texts
    assert len({tuple(t) for t in one.token_ids}) > 1, "degenerate model: all answers equal"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(questions=[]), ValueError, "questions must not be empty"),
        (dict(questions=QUESTIONS[:1], images=images(2)), ValueError, "equal length"),
        (dict(images=["not an image"]), (TypeError, ValueError, FileNotFoundError), "image"),
        (dict(images=[42]), TypeError, "image"),
        (dict(tokens=29, reducer="pool-avg"), ValueError, "valid tokens for this grid"),
        (dict(tokens=577, reducer="fusion"), ValueError, "tokens must be in 1..576"),
        (dict(tokens=64, reducer="none"), ValueError, "keeps all 576 tokens"),
        (dict(reducer="magic"), ValueError, "reducer must be one of"),
    ],
)
def test_bad_input_is_rejected(vlm, kwargs, error, match):
    args = dict(images=images(1), questions=QUESTIONS[:1], tokens=None, reducer="none")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Engine(vlm).generate(args.pop("images"), args.pop("questions"), **args)


def test_a_prompt_and_answer_must_fit_the_lms_positions(vlm):
    engine = Engine(vlm)
    prompt = len(engine._prompt_ids(QUESTIONS[1], 576))
    room = vlm.config.text.max_position_embeddings - prompt
    questions = [QUESTIONS[2], QUESTIONS[1]]  # a short one, then the long one
    fits = engine.generate(images(2), questions, max_new_tokens=room)  # exactly fits
    assert len(fits.texts) == 2
    with pytest.raises(ValueError, match=rf"questions\[1\] needs {prompt + room + 1} positions"):
        engine.generate(images(2), questions, max_new_tokens=room + 1)


def test_a_bad_request_is_refused_before_any_work(vlm):
    engine = Engine(vlm)
    assert engine.check_tokens(None, "none") == 576
    assert engine.check_tokens(None, "fusion") == 576
    assert engine.check_tokens(64, "pool-avg") == 64
    with pytest.raises(TypeError, match="tokens must be an int or None"):
        engine.check_tokens(True, "fusion")
    with pytest.raises(ValueError, match="tokens must be in 1..576"):
        engine.check_tokens(0, "pool-question")
    # the image would fail to load: the tokens are refused first
    with pytest.raises(ValueError, match="tokens must be in 1..576"):
        engine.generate(["/nowhere/image.png"], QUESTIONS[:1], tokens=577, reducer="fusion")


def test_recorded_attn_mass_changes_nothing_and_keeps_each_calls_mass():
    from tokengine.ops import QCCrossAttention

    torch.manual_seed(0)
    attn = QCCrossAttention(8, 2).double()
    queries, image = torch.randn(3, 2, 8).double(), torch.randn(3, 5, 8).double()
    text, cu = torch.randn(4, 8).double(), torch.tensor([0, 1, 1, 4], dtype=torch.int32)
    want_out, want_mass = attn(queries, image, text, cu, return_attn_mass=True)
    keys = list(attn.state_dict())
    with recorded_attn_mass(attn) as masses:
        out = attn(queries.requires_grad_(), image, text, cu)
        attn(queries[:1], image[:1])
    assert torch.equal(out, want_out)
    assert [m.shape for m in masses] == [(3, 5), (1, 5)]
    assert torch.allclose(masses[0].double(), want_mass, atol=1e-6)
    # without a question every query's whole mass goes to the image
    assert torch.allclose(masses[1].sum(1).double(), torch.ones(1).double())
    masses[0][:, 0].sum().backward()  # the mass keeps its graph
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    attn(queries, image)  # after the with: nothing recorded, the output alone
    assert len(masses) == 2 and list(attn.state_dict()) == keys


def test_fusion_needs_trained_weights(vlm):
    reducer, vlm.reducer = vlm.reducer, None
    try:
        with pytest.raises(ValueError, match="needs trained fusion weights"):
            Engine(vlm).generate(images(1), QUESTIONS[:1], tokens=4, reducer="fusion")
    finally:
        vlm.reducer = reducer


def test_fusion_reducer_round_trips_through_save_pretrained(vlm, tmp_path):
    vlm.save_pretrained(tmp_path)
    loaded = VLM.from_pretrained(tmp_path)
    assert isinstance(loaded.reducer, FusionReducer)
    a = Engine(vlm).generate(
        images(2), QUESTIONS[:2], tokens=16, reducer="fusion", max_new_tokens=4
    )
    b = Engine(loaded).generate(
        images(2), QUESTIONS[:2], tokens=16, reducer="fusion", max_new_tokens=4
    )
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_compiled_decode_gives_the_same_answers(vlm, device):
    """``compile=True`` (torch.compile'd vision, prefill and decode step; bucketed prompt and
    cache lengths) changes speed only; the second call reuses the graphs and the zeroed cache of
    the first. On CUDA, inductor writes Triton kernels (bench/gpu_run.sh runs that case)."""
    pytest.importorskip("torch._inductor")
    if device != "cpu":
        vlm = copy.deepcopy(vlm).to(device)
    imgs = images(3, seed=2)
    eager = Engine(vlm).generate(imgs, QUESTIONS[:3], tokens=16, reducer="fusion",
                                 max_new_tokens=5, batch_size=3)  # fmt: skip
    engine = Engine(vlm, compile=True)
    for _ in range(2):
        res = engine.generate(imgs, QUESTIONS[:3], tokens=16, reducer="fusion",
                              max_new_tokens=5, batch_size=3)  # fmt: skip
        assert res.token_ids == eager.token_ids
    assert vlm.lm.max_seq_len % Engine.CACHE_BUCKET == 0
