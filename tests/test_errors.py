"""Every kind of bad input in DESIGN.md's contract raises a clear ValueError/TypeError."""

import pytest
import torch

from tokengine.ops import qc_cross_attention, token_pool

X = torch.randn(2, 576, 8)
S = torch.rand(2, 576)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=[1.0], tokens=4), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randn(576, 8), tokens=4), ValueError, r"x must have shape \(B, N, D\)"),
        (dict(x=X.int(), tokens=4), TypeError, "x must be float32"),
        (dict(x=torch.randn(2, 0, 8), tokens=4), ValueError, "B, N, D >= 1"),
        (dict(x=X, tokens=0), ValueError, "tokens must be >= 1"),
        (dict(x=X, tokens=-3), ValueError, "tokens must be >= 1"),
        (dict(x=X, tokens=4.0), TypeError, "tokens must be an int"),
        (dict(x=X, tokens=29), ValueError, "valid tokens for this grid: .*576"),
        (dict(x=X, tokens=577, mode="topk", scores=S), ValueError, "tokens must be <= N"),
        (dict(x=torch.randn(2, 10, 8), tokens=4), ValueError, "not a square grid"),
        (dict(x=X, tokens=4, grid=(20, 20)), ValueError, "H\\*W = N = 576"),
        (dict(x=X, tokens=4, grid=(24, -24)), ValueError, "grid must be"),
        (dict(x=X, tokens=4, grid="24x24"), TypeError, "grid must be a pair of ints"),
        (dict(x=X, tokens=4, mode="median"), ValueError, "mode must be one of"),
        (dict(x=X, tokens=4, mode="weighted"), ValueError, "needs scores of shape"),
        (dict(x=X, tokens=4, scores=S), ValueError, "scores is only used by"),
        (dict(x=X, tokens=4, mode="topk", scores=S[:1]), ValueError, r"scores must have shape"),
        (dict(x=X, tokens=4, mode="weighted", scores=-S), ValueError, "finite and >= 0"),
        (dict(x=X, tokens=4, mode="topk", scores=S * float("nan")), ValueError, "NaN"),
        (dict(x=X, tokens=4, backend="fortran"), ValueError, "backend must be one of"),
    ],
)
def test_token_pool_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        token_pool(**kwargs)


def attention_inputs(B=3, L=4, N=6, H=4, Hkv=2, D=8, lengths=(2, 0, 3)):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lengths)
    return dict(
        q=torch.randn(B, L, H, D),
        k_img=torch.randn(B, N, Hkv, D),
        v_img=torch.randn(B, N, Hkv, D),
        k_txt=torch.randn(T, Hkv, D),
        v_txt=torch.randn(T, Hkv, D),
        cu_seqlens_txt=cu,
    )


def with_(**changes):
    kwargs = attention_inputs()
    kwargs.update(changes)
    return kwargs


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (with_(q=torch.randn(3, 4, 32)), ValueError, r"q must have shape \(B, L, H, D\)"),
        (with_(q="q"), TypeError, "q must be a torch.Tensor"),
        (with_(q=torch.randn(3, 4, 4, 300)), ValueError, "D <= 256"),
        (with_(k_img=torch.randn(2, 6, 2, 8)), ValueError, "k_img must have shape"),
        (with_(k_img=torch.randn(3, 6, 3, 8)), ValueError, "Hkv dividing H"),
        (with_(k_img=torch.randn(3, 6, 2, 7)), ValueError, "k_img must have shape"),
        (with_(k_img=torch.randn(3, 0, 2, 8)), ValueError, "N >= 1"),
        (with_(v_img=torch.randn(3, 5, 2, 8)), ValueError, "v_img must have the shape of k_img"),
        (with_(k_txt=torch.randn(5, 1, 8)), ValueError, "k_txt must have shape"),
        (with_(v_txt=torch.randn(4, 2, 8)), ValueError, "v_txt must have the shape of k_txt"),
        (with_(v_txt=None), ValueError, "must be given together"),
        (with_(cu_seqlens_txt=None), ValueError, "must be given together"),
        (with_(cu_seqlens_txt=torch.tensor([0, 2, 2, 5])), TypeError, "torch.int32"),
        (
            with_(cu_seqlens_txt=torch.tensor([0, 2, 5], dtype=torch.int32)),
            ValueError,
            r"shape \(B\+1,\)",
        ),
        (
            with_(cu_seqlens_txt=torch.tensor([1, 2, 2, 5], dtype=torch.int32)),
            ValueError,
            "start at 0",
        ),
        (
            with_(cu_seqlens_txt=torch.tensor([0, 3, 2, 5], dtype=torch.int32)),
            ValueError,
            "negative lengths",
        ),
        (
            with_(cu_seqlens_txt=torch.tensor([0, 2, 2, 4], dtype=torch.int32)),
            ValueError,
            "end at the packed length T = 5",
        ),
        (
            with_(k_img=torch.randn(3, 6, 2, 8, dtype=torch.float16)),
            TypeError,
            "must share one dtype",
        ),
        (with_(softmax_scale="big"), TypeError, "softmax_scale must be"),
        (with_(softmax_scale=float("inf")), TypeError, "softmax_scale must be"),
    ],
)
def test_qc_cross_attention_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        qc_cross_attention(**kwargs)


def test_mixed_devices_rejected():
    meta = torch.randn(3, 6, 2, 8, device="meta")  # any second device will do
    with pytest.raises(ValueError, match="must share one device"):
        qc_cross_attention(**with_(k_img=meta, v_img=meta))
    with pytest.raises(ValueError, match="must share one device"):
        token_pool(X, 4, mode="topk", scores=S.to("meta"))


@pytest.mark.parametrize("cli", ["eval", "sweep", "train", "generate", "demo"])
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("mps", "argument --device: expected cpu, cuda or cuda:INDEX, got 'mps'"),
        ("cuda:x", "argument --device: expected cpu, cuda or cuda:INDEX, got 'cuda:x'"),
        (
            "cuda:64",
            "argument --device: cuda:64: this torch sees "
            + (f"{torch.cuda.device_count()} CUDA device" if torch.cuda.is_available() else "no"),
        ),
    ],
)
def test_every_cli_refuses_a_device_it_cannot_use(cli, device, message, capsys):
    # before the check, eval --device cuda on a CPU-only torch died in a pin_memory traceback
    import importlib

    module = importlib.import_module(f"tokengine.{cli}")
    extra = ["--output", "unused"] if cli == "train" else []
    with pytest.raises(SystemExit) as exc:
        getattr(module, "parse_args", module.main)([*extra, "--device", device])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("cli", ["eval", "sweep", "train", "generate", "demo", "info"])
def test_every_cli_option_has_help(cli, monkeypatch):
    # `--help` is the first documentation a user reads: no option may show up in it bare
    import argparse
    import importlib

    seen = []

    def capture(parser, *args, **kwargs):
        seen.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(f"tokengine.{cli}")
    with pytest.raises(SystemExit):
        getattr(module, "parse_args", module.main)([])
    (parser,) = seen
    bare = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert bare == []
