"""Spectral (Raskutti–Wainwright–Yu) early stopping, warm-started at the pretrained model.

The math is in ``THEORY.md`` ("Spectral early stopping"). Gradient descent on the squared loss
``(1/2n) Σ_i ‖f(x_i) − y_i‖²`` of the model linearised at θ0, with step sizes ``α_k``, moves the
predictions as ``f_{k+1} = f_k − (α_k/n) K (f_k − y)``; with ``η_k = Σ_{j<k} α_j``, λ̂_i the eigenvalues of
``K/n`` and the localized empirical complexity ``R̂(ε) = sqrt((1/n) Σ_i min(λ̂_i, ε²))``, the rule stops at

    T̂ = min{k ≥ 1 : R̂(1/√η_k) > R / (2e·σ·η_k)} − 1,

where ``R² = rᵀK⁺r`` (RKHS norm of the warm-start residual ``r = y − f(θ0)``) and ``σ`` is the noise level.
The critical radius is the smallest ``ε > 0`` with ``R̂(ε) ≤ R·ε²/(2eσ)``; RWY's Theorem 1 bounds the
in-sample error ``‖f_T̂ − f*‖²_n`` by a universal constant times ``R²·ε̂²`` (and ``1/η_T̂ ≍ ε̂²``), reported
here as ``bound_scale = R²/η_T̂`` and ``R²·ε̂²``.

* :func:`spectral_stopping_step` is the pure rule (eigenvalues, steps, σ, R) -> step.
* :func:`estimate_sigma`, :func:`rkhs_norm_sq` are the two data-dependent inputs, with their choices.
* :class:`SpectralStopping` plugs the rule into ``taskvec finetune --early-stopping spectral``.

Choices (all exposed; defaults justified in ``docs/ntk.md``):

``r2`` — ``"pinv"`` (``rᵀK⁺r``, eigenvalues under ``rcond·λ1`` dropped; the THEORY.md definition, default),
``"truncated"`` (only eigenmodes with ``λ ≥ trunc·λ1``), ``"ridge"`` (RKHS norm of the cross-validated
kernel-ridge fit of ``r``: a denoised estimate). All three are logged.

``sigma`` — the noise level per output coordinate, estimated as the root of the mean squared
5-fold cross-validated kernel-ridge residual of ``r`` (ridge chosen by the same CV). CV residuals include
the ridge fit's own error, so this errs high (a larger σ stops earlier).

``kernel`` — ``"full"`` (the exact multi-output kernel ``(n·o × n·o)``, default as THEORY.md advises) or
``"trace"`` (``K_tr ⊗ I_o``: the averaged trace kernel, each eigenvalue counted ``o`` times).

Loss mapping: ``mse`` (``½‖f − onehot‖²`` per example, as :func:`taskvec.finetune.loss_fn`) is the rule's
own loss: ``α_k = lr_k``. For cross-entropy the residual is ``y − softmax(f(θ0))`` and the step is scaled
by ``h = mean_i tr(S_i)/(o − 1)``, ``S_i = diag(p_i) − p_i p_iᵀ`` the softmax Jacobian at θ0 on the
sum-zero subspace (GD on CE moves ``y − p`` like GD on the squared loss with step ``h·α``, near θ0).

Optimiser mapping (``adam_mapping``): SGD is exact (``α_k = lr_k``; mini-batch steps equal full-batch
GD in expectation). AdamW has no exact ``η``: ``"path"`` (default) measures at θ0, from a few
mini-batch gradients ``g_b``, the Adam-to-GD factor ``κ = Σ_j ḡ_j²/(√v_j + ε) / Σ_j ḡ_j²`` (``v_j`` = mean
``g_{b,j}²``: the expected loss decrease of one Adam step equals that of a GD step of size ``κ·lr``), and
then follows the kernel-regression path to rescale it as the gradients shrink (Adam divides by a running
``√v``, so its effective GD step grows as residuals fall): ``α_k = lr_k·κ·sqrt(v_0/v̂_k)`` with ``v̂_k`` the
β2-EMA of ``v_0·(w·s_k/s_0 + (1−w)·q_k/q_0)``, ``s_k = Σ λ̂_i c_{ik}²`` (squared full-batch gradient),
``q_k = Σ c_{ik}²`` (mini-batch noise, ∝ squared residual), ``w`` the measured signal share of ``v_0``.
``"init"`` keeps ``κ`` fixed; ``"lr"`` uses ``η = Σ lr`` (wrong by orders of magnitude for Adam; for
comparison). The mapping ignores Adam's change of *direction* (diagonal preconditioning) and weight decay:
treat its predictions as order-of-magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import TaskvecError

E = math.e


class SpectralError(TaskvecError, ValueError):
    """Bad input to the spectral rule."""


# --- the pure rule ------------------------------------------------------------------------------------------


def localized_complexity(eigenvalues, eps: float, n: int | None = None) -> float:
    """``R̂(ε) = sqrt((1/n) Σ_i min(λ̂_i, ε²))`` for eigenvalues ``λ̂`` of ``K/n`` (``n`` default: their count)."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    n = n or lam.size
    return float(np.sqrt(np.minimum(lam, eps * eps).sum() / n))


def cumulative_steps(step_sizes, max_steps: int | None = None) -> np.ndarray:
    """``η_k = Σ_{j<k} α_j`` for ``k = 0..K``: from a sequence ``α_0..α_{K-1}`` or a callable ``k -> α_k``
    with ``max_steps``. Returns ``(K+1,)`` float64 starting with 0."""
    if callable(step_sizes):
        if max_steps is None:
            raise SpectralError("a step-size function needs max_steps")
        a = np.array([float(step_sizes(k)) for k in range(max_steps)])
    else:
        a = np.asarray(step_sizes, dtype=np.float64).reshape(-1)
    if np.any(a < 0) or not np.all(np.isfinite(a)):
        raise SpectralError("step sizes must be finite and non-negative")
    return np.concatenate([[0.0], np.cumsum(a)])


@dataclass
class StoppingPrediction:
    """Output of :func:`spectral_stopping_step`.

    Attributes:
        step: predicted number of optimiser steps T̂ (``None`` if the criterion never fires within the
            given steps: train to the end).
        eta: cumulative step ``η_T̂`` (per unit of ``K/n``).
        critical_radius: ε̂, the smallest ``ε > 0`` with ``R̂(ε) ≤ R ε²/(2eσ)`` (from the eigenvalues).
        bound_scale: ``R²/η_T̂`` — the implied in-sample error bound up to a universal constant.
        bound_radius: ``R²·ε̂²`` — the same bound through the critical radius.
        first_violation: the first ``k`` where the criterion fires (``step + 1``).
        n, sigma, R: the inputs used.
    """

    step: int | None
    eta: float | None
    critical_radius: float
    bound_scale: float | None
    bound_radius: float
    first_violation: int | None
    n: int
    sigma: float
    R: float


def critical_radius(eigenvalues, sigma: float, R: float, n: int | None = None) -> float:
    """Smallest ``ε > 0`` with ``R̂(ε) ≤ R ε² / (2eσ)`` (bisection on log ε; ``R̂(ε)/ε²`` is decreasing)."""
    if sigma <= 0 or R <= 0:
        raise SpectralError(f"sigma and R must be positive, got sigma={sigma}, R={R}")
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    c = R / (2 * E * sigma)

    def ok(eps):
        return localized_complexity(lam, eps, n) <= c * eps * eps

    lo, hi = 1e-300, max(1.0, float(np.sqrt(lam.max() if lam.size else 1.0)))
    while not ok(hi):
        hi *= 2.0
    lo = hi * 1e-30
    if ok(lo):
        return lo
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-12:
            break
    return hi


def spectral_stopping_step(eigenvalues, step_sizes_or_cumulative, sigma: float, R: float, *,
                           n: int | None = None, cumulative: bool = False,
                           max_steps: int | None = None) -> StoppingPrediction:
    """The Raskutti–Wainwright–Yu stopping step (``THEORY.md``).

    Args:
        eigenvalues: λ̂_i, eigenvalues of ``K/n`` (any order; negatives clipped to 0). For a multi-output
            kernel pass all ``n·o`` of them.
        step_sizes_or_cumulative: per-step sizes ``α_0, α_1, ...`` (sequence, or callable with
            ``max_steps``), or with ``cumulative=True`` the cumulative ``η_0 = 0, η_1, ...``.
        sigma: noise level σ (> 0); R: RKHS norm of the warm-start residual (> 0).
        n: number of examples in ``1/n`` (default: the number of eigenvalues). Pass the training-set size
            when the eigenvalues come from a subsample (the sum then extrapolates, see docs/ntk.md).

    Returns:
        :class:`StoppingPrediction`; ``step`` = ``min{k ≥ 1 : Σ_i min(λ̂_i, 1/η_k) > n R²/(4e²σ²η_k²)} − 1``.
    """
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64).reshape(-1), 0, None)
    if lam.size == 0:
        raise SpectralError("no eigenvalues")
    if not (sigma > 0 and R > 0 and math.isfinite(sigma) and math.isfinite(R)):
        raise SpectralError(f"sigma and R must be positive and finite, got sigma={sigma}, R={R}")
    n = int(n or lam.size)
    if cumulative:
        eta = np.asarray(step_sizes_or_cumulative, dtype=np.float64).reshape(-1)
        if eta.size == 0 or eta[0] != 0 or np.any(np.diff(eta) < 0):
            raise SpectralError("cumulative steps must start at 0 and be non-decreasing")
    else:
        eta = cumulative_steps(step_sizes_or_cumulative, max_steps)
    eps_c = critical_radius(lam, sigma, R, n)
    lam_sorted = np.sort(lam)
    csum = np.concatenate([[0.0], np.cumsum(lam_sorted)])
    first = None
    for k in range(1, eta.size):
        e = eta[k]
        if e <= 0:
            continue
        t = 1.0 / e
        j = np.searchsorted(lam_sorted, t)  # λ < t contribute λ, the rest t
        lhs = csum[j] + (lam.size - j) * t
        if lhs > n * R * R / (4 * E * E * sigma * sigma * e * e):
            first = k
            break
    if first is None:
        return StoppingPrediction(None, None, eps_c, None, R * R * eps_c**2, None, n, float(sigma), float(R))
    step = first - 1
    eta_T = float(eta[step])
    return StoppingPrediction(step, eta_T, eps_c, (R * R / eta_T) if eta_T > 0 else None, R * R * eps_c**2,
                              first, n, float(sigma), float(R))


# --- data-dependent inputs -----------------------------------------------------------------------------------


def _eig(K: torch.Tensor):
    K = K.to(torch.float64)
    lam, U = torch.linalg.eigh(0.5 * (K + K.T))
    return lam.flip(0).numpy(), U.flip(1).numpy()


def rkhs_norm_sq(K, r, how: str = "pinv", rcond: float = 1e-7, trunc: float = 1e-3,
                 ridge: float | None = None) -> dict:
    """``R²`` of the residual ``r`` under the kernel ``K`` (unnormalised, ``(m, m)``; ``r`` of length ``m``).

    ``how``: ``"pinv"`` = ``rᵀK⁺r`` dropping eigenvalues below ``rcond·λ1`` (fp32 gradients make smaller
    ones round-off); ``"truncated"``: only modes with ``λ ≥ trunc·λ1``; ``"ridge"``: ``‖f̂‖²_H`` of the
    kernel-ridge fit ``f̂ = K(K + ridge·m·I)⁻¹r`` = ``Σ_i λ_i (u_iᵀr)² / (λ_i + ridge·m)²``.

    Returns ``{"R2", "how", "share_below_1e-3"}``: the last is the share of ``rᵀK⁺r`` carried by modes under
    ``1e-3·λ1`` (THEORY.md: 86–97% on MiniLM tasks).
    """
    lam, U = _eig(torch.as_tensor(K))
    c2 = (U.T @ np.asarray(r, dtype=np.float64).reshape(-1)) ** 2
    keep = lam > rcond * lam[0]
    contrib = np.where(keep, c2 / np.where(keep, lam, 1.0), 0.0)
    pinv = float(contrib.sum())
    low = lam < 1e-3 * lam[0]
    share = float(contrib[low].sum() / pinv) if pinv > 0 else 0.0
    if how == "pinv":
        val = pinv
    elif how == "truncated":
        val = float(contrib[lam >= trunc * lam[0]].sum())
    elif how == "ridge":
        if ridge is None:
            raise SpectralError("r2='ridge' needs the ridge (from estimate_sigma)")
        m = lam.size
        lp = np.clip(lam, 0, None)
        val = float((lp * c2 / (lp + ridge * m) ** 2).sum())
    else:
        raise SpectralError(f"unknown r2 definition {how!r}; valid: pinv, truncated, ridge")
    return {"R2": val, "how": how, "share_below_1e-3": share, "R2_pinv": pinv}


def estimate_sigma(K_trace, residual, folds: int = 5, seed: int = 0, ridges=None) -> dict:
    """Noise level σ per output coordinate: sqrt of the mean squared ``folds``-fold cross-validated
    kernel-ridge residual of ``residual (n, o)`` on the ``(n, n)`` kernel, ridge chosen by the same CV
    (grid ``10^-6..10^1`` relative to ``K/n``). Returns ``{"sigma", "ridge", "cv_mse"}``."""
    from .spectrum import kernel_ridge_cv

    R = np.asarray(residual, dtype=np.float64)
    if R.ndim == 1:
        R = R[:, None]
    cv = kernel_ridge_cv(K_trace, R, ridges=ridges, folds=folds, seed=seed)
    return {"sigma": float(math.sqrt(max(cv["residual_var"], 1e-30))), "ridge": cv["ridge"],
            "cv_mse": cv["cv_mse"]}


def softmax_curvature(logits) -> float:
    """``h = mean_i tr(diag(p_i) − p_i p_iᵀ)/(o − 1)``: the CE Hessian in logit space on the sum-zero
    subspace (1/2 for a binary task at p = 1/2), used to map CE steps onto squared-loss steps."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    o = p.shape[-1]
    tr = (p - p * p).sum(-1)
    return float(tr.mean() / max(o - 1, 1))


def adam_path_steps(lrs: np.ndarray, lam: np.ndarray, coef: np.ndarray, kappa: float, signal_share: float,
                    beta2: float = 0.999, loss_scale: float = 1.0) -> np.ndarray:
    """Effective GD step sizes of Adam along the kernel-regression path (module docstring, ``"path"``).

    Args:
        lrs: Adam learning rates per step ``(K,)``; lam: eigenvalues of ``K/n`` ``(m,)``;
        coef: residual coordinates in the eigenbasis ``(m,)``; kappa: Adam-to-GD factor at θ0;
        signal_share: ``w = ‖ḡ‖²/mean_b ‖g_b‖²`` at θ0; beta2: Adam's β2; loss_scale: CE curvature ``h``
            (1 for the squared loss).
    Returns:
        ``(K,)`` effective step sizes ``α_k``.
    """
    lam = np.clip(lam, 0, None)
    c2 = np.asarray(coef, dtype=np.float64) ** 2
    s0, q0 = float((lam * c2).sum()), float(c2.sum())
    if s0 <= 0 or q0 <= 0:
        return np.asarray(lrs, dtype=np.float64) * kappa * loss_scale
    w = min(max(signal_share, 0.0), 1.0)
    out = np.empty(len(lrs))
    ema, corr = 0.0, 0.0
    decay = np.ones_like(c2)
    for k, lr in enumerate(lrs):
        inst = w * float((lam * c2 * decay).sum()) / s0 + (1 - w) * float((c2 * decay).sum()) / q0
        ema = beta2 * ema + (1 - beta2) * inst
        corr = beta2 * corr + (1 - beta2)
        v = max(ema / corr, 1e-30)
        a = lr * kappa * loss_scale / math.sqrt(v)
        out[k] = a
        decay = decay * (1.0 - a * lam) ** 2
    return out


from .spectral_rule import SpectralStopping, SpectralSummary  # noqa: E402, F401  (the rule, re-exported)
