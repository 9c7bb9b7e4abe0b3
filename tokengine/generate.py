"""``python -m tokengine.generate``: answer one question about one image, for a quick look.

    python -m tokengine.generate --image cat.png --question "What is this?" --tokens 64 \
        --model PATH [--reducer pool-avg] [--device cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import sys

import torch

from tokengine.engine import Engine
from tokengine.models.reducer import REDUCERS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model(name: str) -> str:
    """A shipped model name (e.g. tokengine-tiny) to its packaged directory; paths pass through."""
    from tokengine.models import tiny

    if name in tiny.available_models():
        return str(tiny.shipped_path(name))
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokengine.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--model", default="tokengine-tiny", help="model directory or name")
    parser.add_argument("--tokens", type=int, default=None, help="N_l (default: all)")
    parser.add_argument(
        "--reducer",
        choices=REDUCERS,
        default=None,
        help="default: fusion when the model has one, else none / pool-avg",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)

    engine = Engine.from_pretrained(
        resolve_model(args.model), dtype=DTYPES[args.dtype], device=args.device
    )
    reducer = args.reducer or default_reducer(engine, args.tokens)
    res = engine.generate(
        [args.image],
        [args.question],
        tokens=args.tokens,
        reducer=reducer,
        max_new_tokens=args.max_new_tokens,
    )
    t = res.timings
    print(res.texts[0])
    print(
        f"[{reducer}, N_l={res.image_tokens[0]}] TTFT {res.ttft_ms[0]:.1f} ms (vision "
        f"{t['vision_ms']:.1f}, reduce {t['reduce_ms']:.1f}, prefill {t['prefill_ms']:.1f}), "
        f"decode {t['decode_tokens_per_s']:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


def default_reducer(engine: Engine, tokens: int | None) -> str:
    """fusion for models trained with it; otherwise all tokens, or grid pooling to N_l."""
    if engine.vlm.reducer is not None:
        return "fusion"
    return "none" if tokens is None else "pool-avg"


if __name__ == "__main__":
    sys.exit(main())
