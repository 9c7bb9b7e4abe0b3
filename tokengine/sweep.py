"""``python -m tokengine.sweep``: accuracy and latency per (N_l, reducer), power-law fits, report.

    python -m tokengine.sweep --tokens 1,4,16,64,144,256,576 \
        --reducer fusion,fusion-noq,pool-avg --tasks synth --output runs/sweep

Each finished (reducer, N_l) point is appended to ``points.jsonl`` in ``--output`` (its
per-sample predictions go to ``samples/<reducer>-<N_l>/``); rerunning
the same command skips finished points, so a killed sweep resumes where it stopped. At the end
S = k * N^gamma is fitted per task and reducer (least squares in log-log space, R^2, bootstrap
interval; also the paper's c and alpha), and ``report.md``, ``fits.json`` and ``sweep.png``
(score vs N_l with the fitted lines, latency vs N_l) are written.

Under ``torchrun --nproc-per-node K -m tokengine.sweep ...`` the samples of every point are
sharded across ranks (gloo on CPU, nccl on GPU) and gathered on rank 0, which writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from tokengine import eval as tk_eval
from tokengine.engine import Engine
from tokengine.models import tiny
from tokengine.models.reducer import REDUCERS
from tokengine.scaling import fit_power_law

POINTS_FILE = "points.jsonl"
R2_HOLDS = 0.9  # R^2 of the log-log line from which we say the power law holds
VERDICT_POINTS = 3  # fewest points a verdict rests on: a line through two has R^2 = 1


def verdict(entry: dict) -> str:
    """Whether the power law holds for one fit_all entry: judged on the points above chance
    when at least VERDICT_POINTS are, else on all points."""
    above = entry["above_chance"]
    fit = above if above.get("n_points", 0) >= VERDICT_POINTS else entry["all"]
    if "gamma" not in fit:
        return f"cannot be fitted ({fit['error']})"
    if fit["n_points"] < VERDICT_POINTS:
        return f"cannot be judged (only {fit['n_points']} points)"
    if fit["r2"] is None:
        return "flat: the same score at every N_l, nothing to fit"
    holds = "holds" if fit["r2"] >= R2_HOLDS else "does not hold"
    return f"{holds} (R² {fit['r2']:.2f}, γ {fit['gamma']:.3f}, {fit['n_points']} points)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tokengine.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", default="1,4,16,64,144,256,576", help="comma-separated N_l")
    p.add_argument(
        "--reducer",
        default="fusion,fusion-noq,pool-avg",
        help=f"comma-separated, from {', '.join(REDUCERS)}",
    )
    tk_eval.add_run_arguments(p)
    p.add_argument(
        "--noq-model",
        default=None,
        help="model for fusion-noq points (the question-free fine-tuned ablation); "
        "default: <model>-noq when shipped, else --model",
    )
    p.add_argument(
        "--output",
        default="runs/sweep",
        help="directory of points.jsonl (resumed if there), fits, report and plot; "
        "default %(default)s",
    )
    p.add_argument(
        "--max-points",
        type=int,
        default=None,
        help="stop after this many new points (resume later with the same command)",
    )
    p.add_argument(
        "--n-boot", type=int, default=2000, help="bootstrap resamples per fit; default %(default)s"
    )
    args = p.parse_args(argv)
    tk_eval.check_run_arguments(p, args)
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    args.reducer = args.reducer.split(",")
    bad = [r for r in args.reducer if r not in REDUCERS]
    if bad:
        p.error(f"unknown reducer(s) {bad}; choose from {', '.join(REDUCERS)}")
    for flag, values in (("--tokens", args.tokens), ("--reducer", args.reducer)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            p.error(f"{flag} names {', '.join(twice)} more than once")
    for flag, value, least in (
        ("--max-points", args.max_points, 0),
        ("--n-boot", args.n_boot, 1),
    ):
        if value is not None and value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    return args


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def read_points(path: Path) -> list[dict]:
    """Finished points; a line cut short by a kill is ignored (that point reruns)."""
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return points


def model_for(reducer: str, args: argparse.Namespace) -> str:
    if reducer != "fusion-noq":
        return args.model
    if args.noq_model:
        return args.noq_model
    noq = f"{args.model}-noq"
    return noq if noq in tiny.available_models() else args.model


def run_points(args: argparse.Namespace, rank: int) -> list[dict]:
    out = Path(args.output)
    points_file = out / POINTS_FILE
    points = read_points(points_file)
    settings = {
        "tasks": args.tasks,
        "limit": args.limit,
        "dtype": args.dtype,
        "model": args.model,
        "seed": args.seed,
    }
    for p in points:
        if p["settings"] != settings:
            raise ValueError(
                f"{points_file} holds points of other settings {p['settings']}; "
                f"use another --output (this run: {settings})"
            )
    done = {(p["reducer"], p["tokens"]) for p in points}
    todo = [(r, n) for r in args.reducer for n in args.tokens if (r, n) not in done]
    if args.max_points is not None:
        todo = todo[: args.max_points]
    engines: dict[str, tuple[Engine, str]] = {}
    for reducer, tokens in todo:  # every point is checked before the first one runs
        name = model_for(reducer, args)
        if name not in engines:
            vlm, desc, _ = tk_eval.load_model(
                name, tk_eval.DTYPES[args.dtype], args.device, args.seed
            )
            engines[name] = (Engine(vlm), desc)
        engines[name][0].check_tokens(tokens, reducer)
    if rank == 0:  # an unusable --output fails now, not after the first point
        out.mkdir(parents=True, exist_ok=True)
    tasks = None
    for reducer, tokens in todo:
        engine, desc = engines[model_for(reducer, args)]
        if tasks is None:
            tasks = tk_eval.load_tasks(args.tasks, engine.vlm.config.vision.image_size, args.limit)
        results = [
            tk_eval.run_task(
                engine,
                t,
                tokens=tokens,
                reducer=reducer,
                batch_size=args.batch_size,
                progress=rank == 0 and not args.no_progress,
            )
            for t in tasks
        ]
        point = {
            "reducer": reducer,
            "tokens": tokens,
            "model": desc,
            "settings": settings,
            "tasks": {r["task"]: {k: v for k, v in r.items() if k != "samples"} for r in results},
        }
        if rank == 0:
            tk_eval.write_samples(out / "samples" / f"{reducer}-{tokens}", results)
            with open(points_file, "a") as f:
                f.write(json.dumps(point) + "\n")
            avg = tk_eval.synth_average(results)
            print(
                f"[{reducer} N_l={tokens}] "
                + ", ".join(f"{r['task']} {r['score']:.1f}" for r in results)
                + (f" | synth avg {avg:.1f}" if avg is not None else ""),
                flush=True,
            )
        points.append(point)
    return points


def fit_all(points: list[dict], n_boot: int) -> list[dict]:
    """One fit per (task, reducer) on all points, and one on the points above chance."""
    fits = []
    keys = sorted({(t, p["reducer"]) for p in points for t in p["tasks"]})
    for task, reducer in keys:
        pts = sorted(
            (p["tokens"], p["tasks"][task])
            for p in points
            if p["reducer"] == reducer and task in p["tasks"]
        )
        n = [x[0] for x in pts]
        s = [x[1]["score"] for x in pts]
        chance = pts[0][1].get("chance")
        entry = {"task": task, "reducer": reducer, "tokens": n, "scores": s, "chance": chance}
        for label, keep in (
            ("all", [v > 0 for v in s]),
            ("above_chance", [v > (chance or 0) + 1e-6 for v in s]),
        ):
            nn = [x for x, k in zip(n, keep, strict=True) if k]
            ss = [x for x, k in zip(s, keep, strict=True) if k]
            try:
                entry[label] = fit_power_law(nn, ss, n_boot=n_boot).to_dict()
            except ValueError as e:  # too few usable points
                entry[label] = {"error": str(e)}
        fits.append(entry)
    return fits


def _gamma(fit: dict) -> str:
    if "gamma" not in fit:
        return "—"
    return f"{fit['gamma']:.3f} [{fit['gamma_ci'][0]:.3f}, {fit['gamma_ci'][1]:.3f}]"


def _r2(fit: dict) -> str:
    """R² of a fit; "flat" where scores are constant (R² undefined)."""
    if "gamma" not in fit:
        return "—"
    return "flat" if fit["r2"] is None else f"{fit['r2']:.2f}"


def write_report(out: Path, points: list[dict], fits: list[dict]) -> None:
    reducers = sorted({p["reducer"] for p in points})
    tasks = sorted({t for p in points for t in p["tasks"]})
    lines = [
        "# tokengine sweep",
        "",
        f"Model: {points[0]['model']}. Settings: `{json.dumps(points[0]['settings'])}`.",
        "",
        "Fits of S = k·N^γ (least squares in log-log over the swept N_l; 95% bootstrap "
        "interval of γ; the paper's form S = (c/N)^α has α = −γ). `all` fits every point "
        "with S > 0; `above chance` only points whose score beats the majority-answer "
        "baseline; `flat`: the same score at every N_l (R² undefined).",
        "",
        "| task | reducer | chance | k | γ [95% CI] | R² | γ above chance | R² above chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in fits:
        a, b = f["all"], f["above_chance"]
        chance = f"{f['chance']:.1f}" if f["chance"] is not None else "—"
        k = f"{a['k']:.3g}" if "k" in a else "—"
        lines.append(
            f"| {f['task']} | {f['reducer']} | {chance} | {k} | {_gamma(a)} | "
            f"{_r2(a)} | {_gamma(b)} | {_r2(b)} |"
        )
    lines += [
        "",
        "## Scores per N_l",
        "",
        "| task | reducer | "
        + " | ".join(str(n) for n in sorted({p["tokens"] for p in points}))
        + " |",
        "|---|---|" + "---|" * len({p["tokens"] for p in points}),
    ]
    all_n = sorted({p["tokens"] for p in points})
    for task in tasks:
        for reducer in reducers:
            by_n = {
                p["tokens"]: p["tasks"][task]["score"]
                for p in points
                if p["reducer"] == reducer and task in p["tasks"]
            }
            lines.append(
                f"| {task} | {reducer} | "
                + " | ".join(f"{by_n[n]:.1f}" if n in by_n else "" for n in all_n)
                + " |"
            )
    lines += [
        "",
        "## Where the power law holds",
        "",
        f"A fit counts as holding when R² >= {R2_HOLDS} (fit on the points above chance "
        f"where there are at least {VERDICT_POINTS}, else on all points; a line through two "
        "points has R² = 1 whatever they are).",
        "",
    ]
    lines += [f"- {f['task']}, {f['reducer']}: {verdict(f)}" for f in fits]
    if {"fusion", "fusion-noq"} <= set(reducers):
        lines += [
            "",
            "## Question-conditioned fusion minus question-free fusion (points)",
            "",
            "| task | " + " | ".join(str(n) for n in all_n) + " | wins |",
            "|---|" + "---|" * (len(all_n) + 1),
        ]
        for task in tasks:
            score = {
                (p["reducer"], p["tokens"]): p["tasks"][task]["score"]
                for p in points
                if task in p["tasks"]
            }
            diffs = [
                score.get(("fusion", n), np.nan) - score.get(("fusion-noq", n), np.nan)
                for n in all_n
            ]
            wins = sum(d > 0 for d in diffs)
            lines.append(
                f"| {task} | "
                + " | ".join(f"{d:+.1f}" for d in diffs)
                + f" | {wins}/{len(diffs)} |"
            )
    lines += [
        "",
        "## Latency per N_l (TTFT p50 ms, averaged over tasks)",
        "",
        "| reducer | " + " | ".join(str(n) for n in all_n) + " |",
        "|---|" + "---|" * len(all_n),
    ]
    for reducer in reducers:
        ttft = {
            p["tokens"]: np.mean([t["ttft_p50_ms"] for t in p["tasks"].values()])
            for p in points
            if p["reducer"] == reducer
        }
        lines.append(
            f"| {reducer} | "
            + " | ".join(f"{ttft[n]:.1f}" if n in ttft else "" for n in all_n)
            + " |"
        )
    lines += ["", "![score and latency vs N_l](sweep.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def plot(out: Path, points: list[dict], fits: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for p in points for t in p["tasks"]})
    reducers = sorted({p["reducer"] for p in points})
    cols = min(len(tasks), 4) + 1
    rows = -(-len(tasks) // (cols - 1))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    colours = dict(zip(reducers, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for i, task in enumerate(tasks):
        ax = axes[i // (cols - 1)][i % (cols - 1)]
        for f in fits:
            if f["task"] != task:
                continue
            c = colours[f["reducer"]]
            ax.plot(f["tokens"], f["scores"], "o", color=c, ms=3, label=f["reducer"])
            if "k" in f["all"]:
                grid = np.geomspace(min(f["tokens"]), max(f["tokens"]), 50)
                fit = f["all"]
                ax.plot(grid, fit["k"] * grid ** fit["gamma"], "-", color=c, lw=1)
            if f["chance"] is not None:
                ax.axhline(f["chance"], color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_title(task, fontsize=8)
        ax.tick_params(labelsize=7)
    for j in range(len(tasks), rows * (cols - 1)):
        axes[j // (cols - 1)][j % (cols - 1)].axis("off")
    axes[0][0].legend(fontsize=6)
    ax = axes[0][-1]
    for reducer in reducers:
        pts = sorted(
            (p["tokens"], np.mean([t["ttft_p50_ms"] for t in p["tasks"].values()]))
            for p in points
            if p["reducer"] == reducer
        )
        ax.plot(
            [x for x, _ in pts],
            [y for _, y in pts],
            "o-",
            ms=3,
            color=colours[reducer],
            label=reducer,
        )
    ax.set_xscale("log")
    ax.set_title("TTFT p50 (ms) vs N_l", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    for r in range(1, rows):
        axes[r][-1].axis("off")
    fig.supxlabel("N_l (vision tokens, log scale); score in %; dotted: chance", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = parse_args(argv)
    rank, _ = _init_distributed(args.device)
    torch.manual_seed(args.seed)
    points = run_points(args, rank)
    if rank != 0:
        return None
    wanted = {(r, n) for r in args.reducer for n in args.tokens}
    points = [p for p in points if (p["reducer"], p["tokens"]) in wanted]
    if {(p["reducer"], p["tokens"]) for p in points} != wanted:
        print(f"stopped with {len(points)}/{len(wanted)} points; rerun to resume")
        return points
    out = Path(args.output)
    fits = fit_all(points, args.n_boot)
    (out / "fits.json").write_text(json.dumps(fits, indent=2) + "\n")
    write_report(out, points, fits)
    plot(out, points, fits)
    print(f"wrote {out}/report.md, fits.json and sweep.png")
    return points


def _shutdown_distributed(ok: bool) -> None:
    """Tear the process group down together: a rank that exits while another still writes the
    report aborted at interpreter exit in about 1 of 15 torchrun runs (gloo, measured)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if ok:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    ok = False
    try:
        main()
        ok = True
    except (ValueError, OSError) as e:  # OSError: missing files, unusable --output
        sys.exit(f"error: {e}")
    finally:
        _shutdown_distributed(ok)
