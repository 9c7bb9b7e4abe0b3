"""MODEL_CARD.md and training.json of a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tokengine.data.synthetic import FAMILIES
from tokengine.models import VLM
from tokengine.training.common import LOG_FILE, STATE_FILE
from tokengine.training.scoring import clearly_lower, majority_baseline


def _score_table(scores: dict[str, dict], majority: dict[str, tuple[str, float]]) -> str:
    keys = list(scores)
    lines = ["| family | majority answer | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for fam in [*FAMILIES, "mean"]:
        if fam == "mean":
            base = f"{np.mean([m[1] for m in majority.values()]):.3f}"
        else:
            base = f"{majority[fam][1]:.3f} ({majority[fam][0]})"
        lines.append(f"| {fam} | {base} | " + " | ".join(f"{scores[k][fam]:.3f}" for k in keys)
                     + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


SELECT_NOTE = (
    "; then a cross-attention over the image alone makes each output token a weighted mix of "
    "image tokens (`select_image`)"
)


def model_card(summary: dict, vlm: VLM, size_bytes: int, name: str) -> str:
    """MODEL_CARD.md text from a training summary (training.json): what was run, for how long,
    and the scores, with the issue's quality targets checked against the test split."""
    variant, c, meta = summary["variant"], summary["stage_c"], summary["cache"]
    a = meta["stage_a"]
    test = summary.get("test", {})
    majority = majority_baseline(summary["test_per_family"])
    lines = [f"# {name}", ""]
    if test:
        top, low = test[f"{variant}@576"], test[f"{variant}@1"]
        checks = {
            "existence, colour, shape >= 0.90 at N_l=576":
                all(top[f] >= 0.9 for f in ("existence", "colour", "shape")),
            "mean >= 0.70 at N_l=576": top["mean"] >= 0.7,
            "N_l=1 clearly lower than N_l=576 on counting, text and chart (by more than two "
            "standard errors of a score on this many questions)":
                all(clearly_lower(low[f], top[f], summary["test_per_family"])
                    for f in ("counting", "text", "chart")),
        }  # fmt: skip
        lines += [
            f"Test split ({summary['test_per_family']} questions per family, answers generated "
            f"by the Engine): mean accuracy **{top['mean']:.3f}** at N_l=576 and "
            f"{low['mean']:.3f} at N_l=1 with `{variant}`; always answering each family's most "
            f"common answer scores {np.mean([m[1] for m in majority.values()]):.3f}.",
            "",
            "Quality targets set for tokengine-tiny:",
            *[f"- {k}: **{'met' if ok else 'not met'}**" for k, ok in checks.items()],
            "",
            _score_table(test, majority),
        ]
    v, t, r = vlm.config.vision, vlm.config.text, vlm.reducer.config
    n_params = sum(p.numel() for p in vlm.parameters())
    lines += [
        "## Architecture",
        f"- vision: CLIP ViT, {v.image_size} px, {v.patch_size} px patches "
        f"({v.image_size // v.patch_size}x{v.image_size // v.patch_size} tokens), width "
        f"{v.hidden_size}, {v.num_hidden_layers} layers, {v.num_attention_heads} heads, MLP "
        f"{v.intermediate_size}; last layer, CLS dropped.",
        f"- reducer `{variant}`: {r.num_queries} nested learned queries, {r.num_layers} blocks "
        f"[self-attention{' over queries + question' if variant == 'fusion' else ''} -> "
        f"qc cross-attention over image{' + question' if variant == 'fusion' else ''} -> MLP], "
        f"width {r.vision_dim}, {r.num_heads} heads{SELECT_NOTE if r.select_image else ''}. "
        "One checkpoint serves N_l = 1..576; `pool-*` reducers run on the same weights.",
        f"- reducer positions (learned, sin/cos-initialised, added to LayerNorm-ed tokens): "
        f"{r.question_positions} question positions, {r.image_positions} image positions.",
        f"- projector: mlp2x_gelu {v.hidden_size} -> {t.hidden_size} -> {t.hidden_size}.",
        f"- LM: Llama, width {t.hidden_size}, {t.num_hidden_layers} layers, "
        f"{t.num_attention_heads} heads / {t.num_key_value_heads} KV heads, SwiGLU "
        f"{t.intermediate_size}; word-level tokenizer of {t.vocab_size} entries; prompt "
        "`USER: <image>\\n{question} ASSISTANT:`, one-word answers.",
        f"- {n_params / 1e6:.2f}M parameters, fp32 safetensors; {size_bytes / 2**20:.2f} MiB "
        "on disk.",
        "",
        "## Training",
        f"Command (from the repository root; on {summary.get('device', 'the CPU')}; torch "
        "threads as given by `--threads`):",
        "",
        "```",
        " ".join(summary["argv"]),
        "```",
        "",
        *([f"Test split scored afterwards with `{' '.join(summary['test_argv'])}`.", ""]
          if "test_argv" in summary else []),
        f"- seed {summary['seed']}; stage c wall time {c['seconds'] / 60:.1f} min "
        f"({c['steps']} steps, {c['samples_seen']} samples); the last invocation (the whole run "
        f"unless resumed) took {summary['wall_seconds_this_run'] / 60:.1f} min including validation"
        f"{' and the test split' if 'test' in summary and 'test_argv' not in summary else ''}.",
        f"- feature cache (stages a and b, shared by the variants; built by the first run that "
        f"found none): dense vision pre-training {a['steps']} steps x "
        f"{a['images'] // max(a['steps'], 1)} images in {a['seconds'] / 60:.1f} min, held-out "
        f"accuracy {a['patch_accuracy_fg']}; {meta['samples']} cached grids in "
        f"{meta['cache_seconds'] / 60:.1f} min.",
        f"- loss (answer + EOS cross-entropy, plus the training-only answer probe) first 20 "
        f"steps {np.mean(c['loss_first']):.3f}, last 20 {np.mean(c['loss_last']):.3f}.",
        "",
        "Validation (held-out slice of the training stream, first-token accuracy on cached "
        "features), during training:",
        "",
        *([f"- step {x['step']}: " + ", ".join(f"{k} {x[k]['mean']:.3f}" for k in x
                                              if isinstance(x[k], dict)) for x in c["val_log"]]
          or ["- (none)"]),
        "",
        "and at the end (the majority column is the test split's, for scale):",
        "",
        _score_table(c["val_final"], majority),
    ]  # fmt: skip
    return "\n".join(lines)


def write_card(out: Path, summary: dict, vlm: VLM) -> None:
    """training.json and MODEL_CARD.md of the model in ``out``."""
    (out / LOG_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    # the checkpoint's own files: not the resume state, nor logs copied in beside it
    size = sum(f.stat().st_size for f in out.iterdir()
               if f.is_file() and f.name != STATE_FILE and f.suffix != ".log")  # fmt: skip
    (out / "MODEL_CARD.md").write_text(model_card(summary, vlm, size, out.resolve().name))
