"""The probe-calibrated mean-NLL change (taskvec.lm_probe): exact when the probe is everything or the Taylor
terms are exact, unbiased over random probes when the Taylor terms are badly off, and its ±uncertainty covers."""

import torch

from taskvec.lm_predict import mean_nll_change
from taskvec.lm_probe import calibrate_nll, probe_nll_change, probe_positions


def _data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_tok = torch.randint(5, 40, (n,), generator=g)
    first = -0.3 * n_tok * (1 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64))
    half = 0.2 * n_tok * torch.rand(n, generator=g, dtype=torch.float64)
    # the measured change: a saturating, example-dependent function of the terms, far from first + half
    true = -0.02 * n_tok + 0.1 * first + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return first, half, n_tok, true


def test_a_probe_of_every_example_is_the_measurement():
    first, half, n_tok, true = _data()
    pos = torch.arange(60)
    got = probe_nll_change(first, half, n_tok, pos, true[pos])
    assert abs(got["predicted"] - mean_nll_change(true, n_tok)) < 1e-12 and got["uncertainty"] == 0


def test_exact_taylor_terms_are_kept():
    first, half, n_tok, _ = _data()
    exact = first + half
    pos = probe_positions(60, 8, seed=3)
    theta = calibrate_nll(first[pos], half[pos], n_tok[pos], exact[pos])
    assert torch.allclose(theta, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), atol=1e-9)
    got = probe_nll_change(first, half, n_tok, pos, exact[pos])
    assert abs(got["predicted"] - mean_nll_change(exact, n_tok)) < 1e-9
    assert got["taylor_consistent"] and abs(got["taylor_bias"]) < 1e-12


def test_off_taylor_terms_are_rectified_without_bias_and_the_band_covers():
    first, half, n_tok, true = _data()
    want = mean_nll_change(true, n_tok)
    taylor = mean_nll_change(first + half, n_tok)
    assert abs(taylor - want) > 0.1  # the plain expansion is far off
    preds, covered, inconsistent = [], 0, 0
    for seed in range(200):
        pos = probe_positions(60, 12, seed=seed)
        got = probe_nll_change(first, half, n_tok, pos, true[pos])
        preds.append(got["predicted"])
        covered += abs(got["predicted"] - want) <= got["uncertainty"]
        inconsistent += not got["taylor_consistent"]
    preds = torch.tensor(preds)
    assert abs(float(preds.mean()) - want) < 0.25 * float(preds.std())  # unbiased over random probes
    assert float((preds - want).abs().mean()) < 0.3 * abs(taylor - want)
    assert covered >= 0.85 * 200  # ±2 se covers (the smoothing makes it a little conservative)
    assert inconsistent >= 0.9 * 200  # the probe sees the expansion's bias
