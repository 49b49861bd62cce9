"""Predicted mean-NLL changes outside the linear regime: the log-likelihood's Taylor terms calibrated on a probe.

The LM counterpart of :mod:`taskvec.validation.probe`. When the series along a merge direction diverges
(curvature ρ ≥ 1), ℓ0 + J·Δ + ½·D²ℓ misses the measured change by nats. The merged model's log-likelihoods on
a small random probe P of k of the n evaluation examples fix that at k/n of one measurement:

1. **calibrate** the per-example change on P, ``Δℓ_i ≈ α·(J·Δ)_i + β·(½D²ℓ)_i + c·n_i`` (n_i the example's
   scored tokens), ridge-shrunk towards the plain expansion α = β = 1, c = 0 with the weight of one
   pseudo-example of typical size per coefficient (so a one-example probe does not fit a line through it);
2. **rectify** with the probe's own errors (prediction-powered inference): the calibrated Δℓ of the n − k
   examples outside P plus (n − k)/k times the summed out-of-fold error of the calibration on P (K-fold
   cross-fitting), plus the probe's measured Δℓ itself; divided by Σ n_i tokens it is an unbiased estimate of
   the evaluation subset's mean-NLL change whatever the Taylor terms are worth;
3. **uncertainty** = 2 standard errors of that estimate in nats per token, ``2·(n − k)·sd/√k / Σ n_i``, with
   sd² the probe's error variance smoothed by one pseudo-error as large as the probe's mean squared change.

Pure functions of ``(n,)`` float64 tensors (nats).
"""

from __future__ import annotations

import math

import torch

from .validation.probe import PROBE_FOLDS, probe_positions

__all__ = ["calibrate_nll", "probe_nll_change", "probe_positions"]


def calibrate_nll(first: torch.Tensor, half: torch.Tensor | None, n_tokens: torch.Tensor, y: torch.Tensor,
                  ridge: float = 1.0) -> torch.Tensor:
    """``(α, β, c)`` of ``y ≈ α·first + β·half + c·n_tokens`` on probe examples (all ``(k,)``), ridge towards
    ``(1, 1, 0)`` with weight ``ridge·mean(column²)`` per coefficient (β = 0 and not fitted without ``half``)."""
    cols = [first.double(), half.double() if half is not None else torch.zeros_like(first, dtype=torch.float64),
            n_tokens.double()]
    X = torch.stack(cols, 1)
    prior = torch.tensor([1.0, 1.0 if half is not None else 0.0, 0.0], dtype=torch.float64)
    w = ridge * (X ** 2).mean(0).clamp_min(1e-12)
    if half is None:
        w[1] = 1e12  # pins β at its prior 0
    A = X.T @ X + torch.diag(w)
    A = 0.5 * (A + A.T)
    return torch.linalg.solve(A, X.T @ y.double() + w * prior)


def _apply(theta, first, half, n_tokens):
    out = theta[0] * first.double() + theta[2] * n_tokens.double()
    return out + theta[1] * half.double() if half is not None else out


def probe_nll_change(first: torch.Tensor, half: torch.Tensor | None, n_tokens: torch.Tensor, pos: torch.Tensor,
                     measured: torch.Tensor, folds: int = PROBE_FOLDS, ridge: float = 1.0) -> dict:
    """Predicted mean-NLL change of a merge on the whole evaluation subset from its Taylor terms and a probe.

    Args:
        first, half: ``(n,)`` the examples' J·Δ and ½·D²ℓ[Δ, Δ] (nats; ``half`` may be None).
        n_tokens: ``(n,)`` scored tokens per example.
        pos: ``(k,)`` probe positions; ``measured``: ``(k,)`` the merged model's Δℓ there (nats).

    Returns ``{"predicted" (nats per token), "se", "uncertainty" (2·se), "n_probe", "alpha", "beta",
    "taylor_bias" (mean error of the plain expansion on P, nats per token), "taylor_bias_se",
    "taylor_consistent" (|bias| ≤ 2·its se)}`` (module docstring).
    """
    n, k = first.shape[0], int(pos.numel())
    if k == 0:
        raise ValueError("probe_nll_change needs at least one probe example")
    hs = (lambda idx: half[idx]) if half is not None else (lambda idx: None)  # noqa: E731
    y = measured.double()
    theta = calibrate_nll(first[pos], hs(pos), n_tokens[pos], y, ridge)
    rest = torch.ones(n, dtype=torch.bool)
    rest[pos] = False
    oof = torch.empty(k, dtype=torch.float64)
    folds = max(1, min(folds, k))
    fold_of = torch.arange(k) % folds
    for j in range(folds):
        te, tr = fold_of == j, fold_of != j
        th = theta if folds == 1 else calibrate_nll(first[pos[tr]], hs(pos[tr]), n_tokens[pos[tr]], y[tr], ridge)
        p = pos[te]
        oof[te] = _apply(th, first[p], hs(p), n_tokens[p])
    err = y - oof
    m, total = n - k, float(n_tokens.double().sum())
    dl = float(y.sum()) + float(_apply(theta, first[rest], hs(rest), n_tokens[rest]).sum()) + m * float(err.mean())
    pseudo = float((y ** 2).mean())
    var = (float((err ** 2).sum()) + pseudo) / (k + 1)
    se = m * math.sqrt(var / k) / total
    taylor = first[pos].double() + (half[pos].double() if half is not None else 0)
    err_t = y - taylor
    per_tok = float(n_tokens[pos].double().mean())
    bias = float(err_t.mean()) / per_tok
    bias_se = math.sqrt((float(((err_t - err_t.mean()) ** 2).sum()) + pseudo) / (k + 1) / k) / per_tok
    return {"predicted": -dl / total, "se": se, "uncertainty": 2 * se, "n_probe": k, "alpha": float(theta[0]),
            "beta": float(theta[1]), "taylor_bias": -bias, "taylor_bias_se": bias_se,
            "taylor_consistent": abs(bias) <= 2 * bias_se}
