"""Predictions outside the linear regime: the Taylor expansion calibrated on a small measured probe.

Where the series along a merge direction diverges (curvature ρ ≥ 1: large full-scope merges), the Taylor
prediction f0 + J·Δ + ½·D²f[Δ, Δ] is off by tens of points. A few forward passes of the merged model on a
small random *probe* subset P of each task's evaluation examples (k of n) fix that at a known cost (k/n of
one measurement):

1. **calibrate** the expansion on P: the measured change of every logit is regressed on the Taylor terms,
   ``f(θ0+Δ)_ic − f0_ic ≈ α·(J·Δ)_ic + β·(½D²f)_ic + γ·f0_ic + c_c`` (one α, β, γ per task and merge, one
   intercept per class; ridge-shrunk towards the plain expansion α = β = 1, γ = c = 0, so a tiny probe falls
   back to it), and applied to every example;
2. **rectify** the accuracy with the probe's own errors (prediction-powered inference, Angelopoulos et al.,
   Science 2023): the predicted accuracy of the n − k examples outside P plus the mean error of the
   calibrated prediction on P (each probe example predicted by a fit that did not see it: K-fold
   cross-fitting), plus the probe's measured correctness itself. The estimate is unbiased for the
   evaluation subset's accuracy whatever the Taylor terms are worth; their quality only sets its spread.
3. **uncertainty** = 2 standard errors of that estimate in points, ``200·(n−k)/n·sd/√k``, with sd² the
   probe's error variance smoothed by one pseudo-disagreement (``(Σ(Y−Ŷ)² + 1)/(k + 1)``), so that a probe
   with no errors still owns its sampling error. It means what the Taylor band means: how far the reported
   accuracy could be from the measured one (checked on held-out examples by the calibration table).

Everything here is a pure function of tensors; :mod:`~taskvec.validation.context` measures the probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: ridge weight (per probe example) pulling the calibration towards the plain Taylor expansion
PROBE_RIDGE = 1.0
#: folds of the cross-fitting that gives each probe example a prediction made without it
PROBE_FOLDS = 5


def probe_positions(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` distinct positions of ``range(n)`` drawn with ``torch.Generator().manual_seed(seed)``, sorted
    (``(k,)`` long; all of them when ``k ≥ n``)."""
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


@dataclass
class Calibration:
    """``Δf ≈ alpha·J·Δ + beta·½D²f + gamma·f0 + intercept`` (``intercept`` ``(o,)``)."""

    alpha: float
    beta: float
    gamma: float
    intercept: torch.Tensor

    def apply(self, f0: torch.Tensor, first: torch.Tensor, half_second: torch.Tensor | None) -> torch.Tensor:
        """Calibrated outputs ``(n, o)``."""
        out = f0 + self.alpha * first + self.gamma * f0 + self.intercept
        return out + self.beta * half_second if half_second is not None else out


def calibrate(f0: torch.Tensor, first: torch.Tensor, half_second: torch.Tensor | None, f_true: torch.Tensor,
              ridge: float = PROBE_RIDGE) -> Calibration:
    """Least-squares calibration of the Taylor terms on probe examples (all ``(k, o)``; float64 solve).

    Minimises ``Σ_ic (f_true − f0 − α·a − β·b − γ·f0 − c_c)² + ridge·k·((α−1)² + (β−1)² + γ² + Σ_c c_c²/o)``:
    the data term over the k·o probe logits, the prior term keeping the fit at the plain expansion when the
    probe says little. Without ``half_second`` β is not fitted (0).
    """
    k, o = f0.shape
    cols = [first, f0] + ([half_second] if half_second is not None else [])
    X = torch.stack([c.double().reshape(-1) for c in cols], 1)  # (k·o, 2 or 3)
    onehot = torch.eye(o, dtype=torch.float64).repeat(k, 1)  # class intercepts
    X = torch.cat([X, onehot], 1)
    y = (f_true - f0).double().reshape(-1)
    p = X.shape[1]
    prior = torch.zeros(p, dtype=torch.float64)
    prior[0] = 1.0
    if half_second is not None:
        prior[2] = 1.0
    w = torch.full((p,), ridge * max(k, 1), dtype=torch.float64)
    w[-o:] /= o
    A = X.T @ X + torch.diag(w)
    A = 0.5 * (A + A.T)
    theta = torch.linalg.solve(A, X.T @ y + w * prior)
    beta = float(theta[2]) if half_second is not None else 0.0
    return Calibration(float(theta[0]), beta, float(theta[1]), theta[-o:].float())


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).double()


def probe_prediction(f0: torch.Tensor, first: torch.Tensor, half_second: torch.Tensor | None,
                     labels: torch.Tensor, pos: torch.Tensor, f_probe: torch.Tensor,
                     folds: int = PROBE_FOLDS, ridge: float = PROBE_RIDGE) -> dict:
    """Predicted accuracy of a merge on the whole evaluation subset from its Taylor terms and a probe.

    Args:
        f0, first, half_second: ``(n, o)`` outputs at θ0, J·Δ and ½·D²f[Δ, Δ] (``half_second`` may be None).
        labels: ``(n,)``.
        pos: ``(k,)`` probe positions into the n examples; ``f_probe``: ``(k, o)`` the merged model's
            measured outputs there.

    Returns ``{"predicted" (0–1), "se" (0–1), "uncertainty" (points, 2·se), "n_probe", "alpha", "beta",
    "gamma", "probe_error_rate"}`` (module docstring). The n − k examples outside the probe get the
    calibration fitted on all of P; each probe example's error is taken from the fold fit without it.
    """
    n, k = f0.shape[0], int(pos.numel())
    if k == 0:
        raise ValueError("probe_prediction needs at least one probe example")
    hs = (lambda idx: half_second[idx]) if half_second is not None else (lambda idx: None)  # noqa: E731
    cal = calibrate(f0[pos], first[pos], hs(pos), f_probe, ridge)
    rest = torch.ones(n, dtype=torch.bool)
    rest[pos] = False
    y_p = _correct(f_probe, labels[pos])
    yhat_oof = torch.empty(k, dtype=torch.float64)
    folds = max(1, min(folds, k))
    fold_of = torch.arange(k) % folds
    for j in range(folds):
        te, tr = fold_of == j, fold_of != j
        c = cal if folds == 1 or not bool(tr.any()) else calibrate(
            f0[pos[tr]], first[pos[tr]], hs(pos[tr]), f_probe[tr], ridge)
        p = pos[te]
        yhat_oof[te] = _correct(c.apply(f0[p], first[p], hs(p)), labels[p])
    err = y_p - yhat_oof
    m = n - k
    pred_rest = _correct(cal.apply(f0[rest], first[rest], hs(rest)), labels[rest])
    acc = (float(y_p.sum()) + float(pred_rest.sum()) + m * float(err.mean())) / n
    var = (float((err ** 2).sum()) + 1.0) / (k + 1)
    se = (m / n) * math.sqrt(var / k)
    # the plain expansion checked on the probe: its mean error there and that error's standard error
    taylor = f0[pos] + first[pos] + (half_second[pos] if half_second is not None else 0)
    err_t = y_p - _correct(taylor, labels[pos])
    bias_se = math.sqrt((float((err_t ** 2).sum()) + 1.0) / (k + 1) / k)
    return {"predicted": min(max(acc, 0.0), 1.0), "se": se, "uncertainty": 200 * se, "n_probe": k,
            "alpha": cal.alpha, "beta": cal.beta, "gamma": cal.gamma,
            "probe_error_rate": float((err != 0).double().mean()),
            "taylor_bias": float(err_t.mean()), "taylor_bias_se": bias_se,
            "taylor_consistent": abs(float(err_t.mean())) <= 2 * bias_se}
