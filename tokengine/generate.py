"""``python -m tokengine.generate``: answer one question about one image, for a quick look.

    python -m tokengine.generate --image cat.png --question "What is this?" --tokens 64 \
        --model PATH [--reducer pool-avg] [--device cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import sys

from tokengine.engine import Engine
from tokengine.eval import DTYPES, default_reducer, load_model
from tokengine.models.reducer import REDUCERS
from tokengine.validation import add_device_argument


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokengine.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument("--model", default="tokengine-tiny", help="model directory or name")
    parser.add_argument("--tokens", type=int, default=None, help="N_l (default: all)")
    parser.add_argument(
        "--reducer",
        choices=REDUCERS,
        default=None,
        help="default: fusion when the model has one, else none / pool-avg",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="default float32")
    args = parser.parse_args(argv)

    vlm, model_desc, _ = load_model(args.model, DTYPES[args.dtype], args.device, seed=0)
    engine = Engine(vlm)
    reducer = args.reducer or default_reducer(vlm, args.tokens)
    engine.check_tokens(args.tokens, reducer)
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
        f"[{model_desc}, {reducer}, N_l={res.image_tokens[0]}] "
        f"TTFT {res.ttft_ms[0]:.1f} ms (vision {t['vision_ms']:.1f}, "
        f"reduce {t['reduce_ms']:.1f}, prefill {t['prefill_ms']:.1f}), "
        f"decode {t['decode_tokens_per_s']:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError, TypeError) as e:
        sys.exit(f"error: {e}")
