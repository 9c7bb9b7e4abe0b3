"""The power-law fitter reproduces the paper's fits from its digitised scores."""

import csv
import math
import pathlib

import numpy as np
import pytest

from tokengine.scaling import fit_power_law

DATA = pathlib.Path(__file__).parent / "data"


def paper_points(filename: str, metric: str) -> tuple[list[int], list[float]]:
    with open(DATA / filename) as f:
        rows = [r for r in csv.DictReader(f) if r["benchmark"] == metric]
    return [int(r["n_tokens"]) for r in rows], [float(r["score"]) for r in rows]


# k and gamma as published in the paper's README table (3-4 significant digits).
PAPER_FITS = [
    ("scores_question_fused.csv", "Overall@MME", 1068, 0.0516),
    ("scores_question_fused.csv", "Overall@POPE", 65.19, 0.0503),
    ("scores_question_fused.csv", "Final Score@OCRBench", 60.27, 0.373),
    ("scores_question_fused.csv", "Overall@ChartQA_TEST", 11.75, 0.2370),
    ("scores_question_fused.csv", "Overall@TextVQA_VAL", 14.81, 0.2296),
    ("scores_question_free_ft.csv", "Overall@MME", 902.5, 0.0725),
    ("scores_question_free_ft.csv", "Overall@POPE", 68.7, 0.0377),
    ("scores_question_free_ft.csv", "Final Score@OCRBench", 50.3, 0.414),
    ("scores_question_free_ft.csv", "Overall@ChartQA_TEST", 11.44, 0.2173),
    ("scores_question_free_ft.csv", "Overall@TextVQA_VAL", 11.84, 0.2538),
]


@pytest.mark.parametrize("filename,metric,k,gamma", PAPER_FITS)
def test_reproduces_paper_fits(filename, metric, k, gamma):
    tokens, scores = paper_points(filename, metric)
    assert len(tokens) == 10
    fit = fit_power_law(tokens, scores, n_boot=200)
    # the published values are rounded to 3-4 significant digits
    assert fit.k == pytest.approx(k, rel=2e-3)
    assert fit.gamma == pytest.approx(gamma, abs=6e-4)
    assert fit.gamma_ci[0] <= fit.gamma <= fit.gamma_ci[1]
    assert fit.alpha == -fit.gamma
    assert fit.predict(1) == pytest.approx(fit.k)
    assert (fit.c / 64) ** fit.alpha == pytest.approx(fit.predict(64), rel=1e-9)


def test_exact_power_law_has_r2_one_and_tight_interval():
    n = np.array([1, 4, 16, 64, 144, 256, 576])
    fit = fit_power_law(n, 3.0 * n**0.25, n_boot=100)
    assert fit.k == pytest.approx(3.0) and fit.gamma == pytest.approx(0.25)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.gamma_ci == pytest.approx((0.25, 0.25))


def test_flat_noise_has_low_r2():
    n = np.array([1, 4, 16, 64, 144, 256, 576])
    fit = fit_power_law(n, [0.5, 0.52, 0.49, 0.51, 0.5, 0.48, 0.5], n_boot=100)
    assert abs(fit.gamma) < 0.01 and fit.r2 < 0.5


def test_constant_scores_do_not_overflow_c():
    """gamma ~ 0 (a flat curve) puts c = k^(-1/gamma) beyond float range: reported as None."""
    fit = fit_power_law([1, 4, 16, 64], [50.0, 50.0, 50.0, 50.0], n_boot=20)
    assert abs(fit.gamma) < 1e-12 and math.isnan(fit.r2)  # R^2 of constant data: 0/0
    assert fit.to_dict()["c"] is None and fit.to_dict()["r2"] is None


@pytest.mark.parametrize(
    "tokens,scores,match",
    [
        ([1, 2], [1.0], "equal length"),
        ([1, 2], [0.0, 1.0], "> 0"),
        ([4, 4], [1.0, 2.0], "distinct"),
    ],
)
def test_bad_input(tokens, scores, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(tokens, scores)


def test_needs_a_bootstrap_resample():
    with pytest.raises(ValueError, match="n_boot must be >= 1, got 0"):
        fit_power_law([1, 4], [0.5, 0.6], n_boot=0)
