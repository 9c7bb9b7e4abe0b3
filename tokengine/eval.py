"""``python -m tokengine.eval``: accuracy and latency of a VLM at one N_l and reducer.

    python -m tokengine.eval --tokens 256 [--model tokengine-tiny|PATH] [--reducer fusion]
        [--tasks synth|FAMILY|FILE.tsv ...] [--limit N] [--batch-size B] [--device cpu|cuda]
        [--dtype float32|float16|bfloat16] [--output DIR] [--seed S]

Prints a table (task, metric, score, chance, n, TTFT p50/p90 ms, decode tok/s) and writes
``results.json`` (config, versions, device, scores, timings) and ``samples_<task>.jsonl``
(question, answer, prediction, correct) to ``--output``. ``synth`` is the synthetic suite's
fixed test split (one task per family); a ``.tsv`` path is a VLMEvalKit benchmark file scored
with that benchmark's official metric.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import tokengine
from tokengine import metrics
from tokengine.data import synthetic, vlmevalkit
from tokengine.engine import Engine
from tokengine.models import VLM, tiny
from tokengine.models.reducer import REDUCERS
from tokengine.validation import add_device_argument

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SYNTH_PER_FAMILY = 200  # the fixed test split's size per family
# answer-length limits per kind of task: short answers, or a caption
MAX_NEW_TOKENS = {"synth": 4, "yorn": 8, "mcq": 8, "vqa": 16, "caption": 64}


@dataclass
class Task:
    """One evaluation task: its samples (lazy images) and how to score predictions."""

    name: str
    kind: str  # "synth" or a vlmevalkit task type
    rows: list[dict]  # question, answer (+ TSV fields); images loaded by `image`
    benchmark: str | None = None
    samples: list = field(default_factory=list, repr=False)

    def image(self, i: int):
        if self.kind == "synth":
            return self.samples[i].image
        return vlmevalkit.load_image(self.rows[i])

    def score(self, predictions: list[str]) -> tuple[dict, list[bool | None]]:
        """(metrics with a ``primary`` key, per-sample correctness where defined)."""
        if self.kind == "synth":
            family = self.rows[0]["family"]
            correct = [
                synthetic.normalize_answer(family, p) == r["answer"]
                for p, r in zip(predictions, self.rows, strict=True)
            ]
            majority = Counter(r["answer"] for r in self.rows).most_common(1)[0][1]
            return {
                "accuracy": 100 * float(np.mean(correct)),
                "primary": "accuracy",
                "chance": 100 * majority / len(self.rows),
            }, correct
        rows = [{**r, "prediction": p} for r, p in zip(self.rows, predictions, strict=True)]
        return metrics.score(self.benchmark, rows), [None] * len(rows)


def load_tasks(specs: list[str], image_size: int, limit: int | None) -> list[Task]:
    """``synth`` (every family), a family name, or a VLMEvalKit ``.tsv`` path."""
    tasks = []
    for spec in specs:
        if spec == "synth" or spec in synthetic.FAMILIES:
            families = synthetic.FAMILIES if spec == "synth" else (spec,)
            for family in families:
                n = min(limit or SYNTH_PER_FAMILY, SYNTH_PER_FAMILY)
                samples = synthetic.test_split(family, n_per_family=n, image_size=image_size)
                rows = [
                    {"index": s.uid, "question": s.question, "answer": s.answer, "family": family}
                    for s in samples
                ]
                tasks.append(Task(f"synth/{family}", "synth", rows, samples=samples))
        elif spec.endswith(".tsv") or Path(spec).exists():
            rows = vlmevalkit.load_tsv(spec)[:limit]  # a missing file is named first
            benchmark = vlmevalkit.benchmark_name(spec)
            for row in rows:
                row["question_prompt"] = vlmevalkit.build_prompt(benchmark, row)
            tasks.append(Task(benchmark, vlmevalkit.task_type(benchmark), rows, benchmark))
        else:
            raise ValueError(
                f"unknown task {spec!r}: use 'synth', a family ({', '.join(synthetic.FAMILIES)})"
                " or a path to a VLMEvalKit .tsv file"
            )
    return tasks


def load_model(name: str, dtype: torch.dtype, device: str, seed: int) -> tuple[VLM, str, bool]:
    """(model, description, randomly initialised?). Shipped names resolve to package data."""
    if name in tiny.available_models():
        path = tiny.shipped_path(name)
        return VLM.from_pretrained(path, dtype=dtype, device=device), f"{name} (shipped)", False
    if name == tiny.DEFAULT_MODEL:  # not trained/shipped yet: say so loudly
        vlm = tiny.random_tiny(seed).to(device=device, dtype=dtype)
        return vlm, f"{name} (RANDOMLY INITIALISED: no trained weights shipped)", True
    if not Path(name).exists():
        raise FileNotFoundError(
            f"model {name!r} is neither a shipped model ({', '.join(tiny.available_models())})"
            " nor an existing directory"
        )
    return VLM.from_pretrained(name, dtype=dtype, device=device), name, False


def default_reducer(vlm: VLM, tokens: int | None) -> str:
    if vlm.reducer is not None:
        return "fusion"
    return "none" if tokens is None else "pool-avg"


def _shard(n: int) -> range:
    """This process's share of n samples under torch.distributed (all of them otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return range(torch.distributed.get_rank(), n, torch.distributed.get_world_size())
    return range(n)


def _gather(items: list) -> list:
    """Concatenate every rank's items on every rank (identity without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def run_task(
    engine: Engine,
    task: Task,
    *,
    tokens: int | None,
    reducer: str,
    batch_size: int,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate for every sample of ``task`` (sharded across ranks) and score on every rank."""
    max_new = max_new_tokens or MAX_NEW_TOKENS[task.kind]
    mine = list(_shard(len(task.rows)))
    local = []
    bar = tqdm(total=len(mine), desc=task.name, unit="q", disable=not progress, leave=False)
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        questions = [task.rows[i].get("question_prompt", task.rows[i]["question"]) for i in idx]
        res = engine.generate(
            [task.image(i) for i in idx],
            questions,
            tokens=tokens,
            reducer=reducer,
            max_new_tokens=max_new,
            batch_size=batch_size,
        )
        steps_s = res.timings["decode_ms"] / 1e3
        for j, i in enumerate(idx):
            local.append((i, res.texts[j], res.ttft_ms[j], res.image_tokens[j]))
        local.append((-1, None, steps_s, res.timings["decode_tokens_per_s"] * steps_s))
        bar.update(len(idx))
    bar.close()
    gathered = _gather(local)
    decode_s = sum(x[2] for x in gathered if x[0] < 0)
    decoded = sum(x[3] for x in gathered if x[0] < 0)
    done = sorted(x for x in gathered if x[0] >= 0)
    predictions = [x[1] for x in done]
    scores, correct = task.score(predictions)
    ttft = [x[2] for x in done]
    return {
        "task": task.name,
        "metric": scores["primary"],
        "score": scores[scores["primary"]],
        "chance": scores.get("chance"),
        "n": len(done),
        "image_tokens": done[0][3],
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p90_ms": float(np.percentile(ttft, 90)),
        "decode_tokens_per_s": decoded / decode_s if decode_s else 0.0,
        "metrics": {k: v for k, v in scores.items() if k != "primary"},
        "samples": [
            {
                "index": task.rows[i]["index"],
                "question": task.rows[i]["question"],
                "answer": task.rows[i]["answer"],
                "prediction": p,
                "correct": c,
            }
            for i, p, c in zip(range(len(done)), predictions, correct, strict=True)
        ],
    }


def environment(device: str) -> dict:
    triton = sys.modules.get("triton")
    return {
        "tokengine": tokengine.__version__,
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'task':<24} {'metric':<18} {'score':>7} {'chance':>7} {'n':>5} "
        f"{'TTFT p50':>9} {'TTFT p90':>9} {'tok/s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        chance = f"{r['chance']:7.1f}" if r.get("chance") is not None else f"{'':>7}"
        lines.append(
            f"{r['task']:<24} {r['metric']:<18} {r['score']:7.1f} {chance} {r['n']:5d} "
            f"{r['ttft_p50_ms']:9.1f} {r['ttft_p90_ms']:9.1f} "
            f"{r['decode_tokens_per_s']:7.1f}"
        )
    return "\n".join(lines)


def synth_average(rows: list[dict]) -> float | None:
    synth = [r["score"] for r in rows if r["task"].startswith("synth/")]
    return float(np.mean(synth)) if synth else None


def write_samples(out: Path, rows: list[dict]) -> None:
    """One ``samples_<task>.jsonl`` per task result in ``out`` (question, answer, prediction)."""
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", r["task"])
        with open(out / f"samples_{name}.jsonl", "w") as f:
            for s in r["samples"]:
                f.write(json.dumps(s) + "\n")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options eval and sweep share: the model, the tasks, and how to run them."""
    p.add_argument("--model", default=tiny.DEFAULT_MODEL, help="shipped model name or directory")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["synth"],
        help="synth, a family name, or VLMEvalKit .tsv paths; default synth",
    )
    p.add_argument("--limit", type=int, default=None, help="samples per task (synth: <= 200)")
    p.add_argument("--batch-size", type=int, default=32, help="questions per batch; default 32")
    add_device_argument(p)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="default float32")
    p.add_argument("--seed", type=int, default=0, help="seed of a randomly initialised model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_run_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for the options of :func:`add_run_arguments` that argparse cannot check."""
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tokengine.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int, default=None, help="N_l (default: all image tokens)")
    p.add_argument(
        "--reducer",
        choices=REDUCERS,
        default=None,
        help="default: fusion if the model has one, else none/pool-avg",
    )
    add_run_arguments(p)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length cap (default per task kind: synth 4, yes/no and multiple choice "
        "8, VQA 16, captions 64)",
    )
    p.add_argument("--output", default=None, help="directory for results (default: runs/eval-*)")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    if args.tokens is not None and args.tokens < 1:
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    vlm, model_desc, random_init = load_model(
        args.model, DTYPES[args.dtype], args.device, args.seed
    )
    engine = Engine(vlm)
    reducer = args.reducer or default_reducer(vlm, args.tokens)
    engine.check_tokens(args.tokens, reducer)
    tasks = load_tasks(args.tasks, vlm.config.vision.image_size, args.limit)
    out = Path(args.output or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)  # an unusable --output fails now, not after the run
    print(
        f"model: {model_desc}\nreducer: {reducer}  tokens: {args.tokens or 'all'}  device: "
        f"{args.device}  dtype: {args.dtype}"
    )
    start = time.perf_counter()
    rows = [
        run_task(
            engine,
            t,
            tokens=args.tokens,
            reducer=reducer,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
        )
        for t in tasks
    ]
    print(format_table(rows))
    avg = synth_average(rows)
    if avg is not None:
        print(f"synthetic suite average: {avg:.1f}%")
    if random_init:
        print(
            "NOTE: the model is RANDOMLY INITIALISED (no trained tokengine-tiny is shipped); "
            "these scores measure nothing but chance."
        )
    results = {
        "config": {
            **vars(args),
            "reducer": reducer,
            "model": model_desc,
            "random_init": random_init,
        },
        "environment": environment(args.device),
        "tasks": {r["task"]: {k: v for k, v in r.items() if k != "samples"} for r in rows},
        "synth_average": avg,
        "wall_s": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_samples(out, rows)
    print(f"wrote {out}/results.json and samples_*.jsonl")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, TypeError) as e:  # OSError: missing files, unusable --output
        sys.exit(f"error: {e}")
