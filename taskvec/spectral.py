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

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import TaskvecError
from .modelfn import as_batch, eval_mode
from .stopping import StopDecision, StoppingRule, TrainContext

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


# --- the stopping rule ---------------------------------------------------------------------------------------


@dataclass
class SpectralSummary:
    """What :class:`SpectralStopping` logs (JSON)."""

    rule: str = "spectral"
    predicted_step: int | None = None
    predicted_eta: float | None = None
    beyond_budget: bool = False
    stopped_at: int | None = None
    sigma: float | None = None
    R2: float | None = None
    R2_all: dict = field(default_factory=dict)
    critical_radius: float | None = None
    bound_scale: float | None = None
    n_train: int | None = None
    n_kernel: int | None = None
    num_outputs: int | None = None
    kernel: str | None = None
    r2: str | None = None
    loss: str | None = None
    loss_scale: float | None = None
    optimizer: str | None = None
    adam_mapping: str | None = None
    adam_kappa: float | None = None
    adam_signal_share: float | None = None
    eta_scale: float = 1.0
    eigen_top: list = field(default_factory=list)
    predicted_step_by_choice: dict = field(default_factory=dict)
    seconds: float | None = None
    kernel_cache: str | None = None
    notes: list = field(default_factory=list)


class SpectralStopping(StoppingRule):
    """``--early-stopping spectral``: stop at the RWY step predicted at θ0.

    Args (all optional; CLI ``--rule-arg spectral.KEY=VALUE``):
        max_examples: kernel subsample size m (default 512; CPU start-up stays in seconds-to-minutes).
        params: parameter selection for the kernel (default: the trained selection from the context, else
            ``"qkv"``).
        kernel: ``"full"`` (default) or ``"trace"``.
        r2: ``"pinv"`` (default) | ``"truncated"`` | ``"ridge"``; rcond, trunc: their thresholds.
        sigma: fixed noise level (default: estimated by CV kernel ridge).
        adam_mapping: ``"path"`` (default) | ``"init"`` | ``"lr"``; adam_batches: mini-batches measured at θ0;
            beta2, adam_eps: the optimiser's values (defaults as torch.optim.AdamW).
        eta_scale: multiply every η by this (1.0 = the linearised model; THEORY.md measured the real network
            fitting 1.4–2.2× faster per unit η, i.e. eta_scale≈1.8 would model that).
        mode: kernel mode ``"exact"`` (default) or ``"sketch"`` (with ``sketch_dim``).
        action: ``"stop"`` (default) or ``"log"`` (only log the prediction; never stops).
        seed: subsample/CV seed. chunk_size: NTK chunk size.
        cache_dir: folder for the θ0 kernel (default: none). The key hashes the subsample's tokens, the
            model's outputs on them at θ0 (float64 bytes: a different backbone or head misses), the parameter
            selection and the kernel mode, so runs that differ only in optimiser or learning rate share one
            kernel. ``summary()["kernel_cache"]`` says ``"hit"`` or ``"miss"``.
    """

    name = "spectral"

    def __init__(self, max_examples: int = 512, params=None, kernel: str = "full", r2: str = "pinv",
                 rcond: float = 1e-7, trunc: float = 1e-3, sigma: float | None = None,
                 adam_mapping: str = "path", adam_batches: int = 8, beta2: float = 0.999,
                 adam_eps: float = 1e-8, eta_scale: float = 1.0, mode: str = "exact", sketch_dim: int = 4096,
                 action: str = "stop", seed: int = 0, chunk_size: int | None = None,
                 cache_dir: str | None = None):
        if kernel not in ("full", "trace"):
            raise SpectralError(f"kernel must be 'full' or 'trace', got {kernel!r}")
        if r2 not in ("pinv", "truncated", "ridge"):
            raise SpectralError(f"r2 must be pinv, truncated or ridge, got {r2!r}")
        if adam_mapping not in ("path", "init", "lr"):
            raise SpectralError(f"adam_mapping must be path, init or lr, got {adam_mapping!r}")
        if action not in ("stop", "log"):
            raise SpectralError(f"action must be 'stop' or 'log', got {action!r}")
        self.max_examples, self.params, self.kernel, self.r2 = int(max_examples), params, kernel, r2
        self.rcond, self.trunc = float(rcond), float(trunc)
        self.sigma = None if sigma in (None, "", "none") else float(sigma)
        self.adam_mapping, self.adam_batches = adam_mapping, int(adam_batches)
        self.beta2, self.adam_eps, self.eta_scale = float(beta2), float(adam_eps), float(eta_scale)
        self.mode, self.sketch_dim, self.action = mode, int(sketch_dim), action
        self.seed, self.chunk_size = int(seed), None if chunk_size in (None, "", "none") else int(chunk_size)
        self.cache_dir = None if cache_dir in (None, "", "none") else Path(cache_dir)
        self.info = SpectralSummary()
        self.predicted: int | None = None

    # -- start: everything at θ0 --
    def start(self, ctx: TrainContext) -> None:
        if self.predicted is not None:  # resumed run: prediction restored from state
            return
        t0 = time.perf_counter()
        model = ctx.model
        sels = self._selections(ctx)
        sub, n_all = self._subsample(ctx)
        m = sub["input_ids"].shape[0]
        n = int(ctx.num_train or n_all)
        f0 = self._theta0_logits(model, sub)
        o = f0.shape[1]
        Y = torch.nn.functional.one_hot(sub["labels"].long(), o).double()
        if ctx.loss == "ce":
            resid = Y - torch.softmax(f0, -1)
            loss_scale = softmax_curvature(f0)
        else:
            resid = Y - f0
            loss_scale = 1.0
        K4, cache = self._theta0_kernel(model, sub, f0, sels)
        lam, lam_path, coef, r2s, sig, ridge = self._spectrum(K4, resid)
        R2 = r2s[self.r2]["R2"]
        sigma = sig["sigma"]
        opt = (ctx.optimizer or "sgd").lower()
        alphas, kappa, share = self._step_sizes(ctx, model, sels, opt, loss_scale, lam_path, coef)
        eta = cumulative_steps(alphas * self.eta_scale)
        pred = spectral_stopping_step(lam, eta, sigma, math.sqrt(max(R2, 1e-300)), n=n, cumulative=True)
        by_choice = {}
        for h, v in r2s.items():
            if v["R2"] > 0:
                by_choice[f"r2={h}"] = spectral_stopping_step(lam, eta, sigma, math.sqrt(v["R2"]), n=n,
                                                              cumulative=True).step
        self.predicted = pred.step
        self.info = SpectralSummary(
            predicted_step=pred.step, predicted_eta=pred.eta, beyond_budget=pred.step is None, sigma=sigma,
            R2=R2, R2_all={h: v for h, v in r2s.items()}, critical_radius=pred.critical_radius,
            bound_scale=pred.bound_scale, n_train=n, n_kernel=m, num_outputs=o, kernel=self.kernel, r2=self.r2,
            loss=ctx.loss, loss_scale=loss_scale, optimizer=opt,
            adam_mapping=None if opt == "sgd" else self.adam_mapping, adam_kappa=kappa,
            adam_signal_share=share, eta_scale=self.eta_scale, eigen_top=[float(x) for x in lam[:20]],
            predicted_step_by_choice=by_choice, seconds=time.perf_counter() - t0, kernel_cache=cache,
            notes=([f"kernel on a random subsample of {m} of {n} training examples; sums use n = {n}"]
                   if m < n else []) + ([f"sigma fixed by the user: {self.sigma}"] if self.sigma is not None
                                        else [f"sigma from 5-fold CV kernel ridge (ridge {ridge:g})"]))

    def _subsample(self, ctx) -> tuple[dict, int]:
        """The seeded kernel subsample (at most ``max_examples`` training examples, in order) and the number
        of training examples it was drawn from."""
        batch = as_batch(list(ctx.train_batches()))
        n_all = batch["input_ids"].shape[0]
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n_all, generator=g)[: self.max_examples].sort().values
        return {k: v[idx] for k, v in batch.items()}, n_all

    @staticmethod
    def _theta0_logits(model, sub: dict) -> torch.Tensor:
        """``(m, o)`` float64 logits at θ0 (eval mode, batches of 64), on the CPU."""
        dev = next(model.parameters()).device
        m = sub["input_ids"].shape[0]
        logits = []
        with torch.no_grad(), eval_mode(model):
            for a in range(0, m, 64):
                s = {k: v[a:a + 64].to(dev) for k, v in sub.items()}
                logits.append(model(s["input_ids"], s["attention_mask"], s.get("token_type_ids")).double().cpu())
        return torch.cat(logits)

    def _theta0_kernel(self, model, sub: dict, f0: torch.Tensor, sels) -> tuple[torch.Tensor, str | None]:
        """The full θ0 kernel ``(m, m, o, o)``, from ``cache_dir`` when there (``"hit"``), else computed (and
        cached: ``"miss"``; no cache: None)."""
        from .ntk import empirical_ntk

        key = self._cache_key(sub, f0, sels)
        path = None if self.cache_dir is None else self.cache_dir / f"spectral-kernel-{key}.safetensors"
        if path is not None and path.exists():
            from safetensors.torch import load_file

            return load_file(str(path))["kernel"], "hit"
        res = empirical_ntk(model, sub, params=sels, output="logits", kernel="full", mode=self.mode,
                            groups=False, sketch_dim=self.sketch_dim, seed=self.seed, chunk_size=self.chunk_size)
        K4 = res.kernel
        if path is None:
            return K4, None
        from safetensors.torch import save_file

        from .io import atomic_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"kernel": K4.contiguous()}, str(tmp), metadata={"key": key})
        return K4, "miss"

    def _spectrum(self, K4: torch.Tensor, resid: torch.Tensor):
        """``(λ̂ for the rule, λ̂ along the path, residual coefficients, R² by choice, σ estimate, ridge)``
        from the θ0 kernel and residual, for ``kernel`` = full or trace."""
        m, o = resid.shape
        Kfull = K4.permute(0, 2, 1, 3).reshape(m * o, m * o)  # (m·o, m·o), example-major
        Ktr = torch.diagonal(K4, dim1=2, dim2=3).mean(-1)
        sig = ({"sigma": self.sigma, "ridge": None, "cv_mse": None} if self.sigma is not None
               else estimate_sigma(Ktr, resid.numpy(), seed=self.seed))
        ridge = sig["ridge"]
        if ridge is None:
            ridge = estimate_sigma(Ktr, resid.numpy(), seed=self.seed)["ridge"]
        if self.kernel == "full":
            lam = torch.linalg.eigvalsh(0.5 * (Kfull + Kfull.T) / m).flip(0).numpy()
            r2s = {h: rkhs_norm_sq(Kfull, resid.reshape(-1).numpy(), h, self.rcond, self.trunc, ridge)
                   for h in ("pinv", "truncated", "ridge")}
            lam_path, U = _eig(Kfull / m)
            coef = U.T @ resid.reshape(-1).numpy()
        else:
            lt, Ut = _eig(Ktr / m)
            lam = np.repeat(lt, o)
            r2s = {}
            for h in ("pinv", "truncated", "ridge"):
                parts = [rkhs_norm_sq(Ktr, resid[:, a].numpy(), h, self.rcond, self.trunc, ridge) for a in range(o)]
                r2s[h] = {"R2": sum(p["R2"] for p in parts), "how": h,
                          "share_below_1e-3": float(np.mean([p["share_below_1e-3"] for p in parts]))}
            coef = (Ut.T @ resid.numpy()).T.reshape(-1)  # output-major: (output a, mode i)
            lam_path = np.tile(lt, o)
        return lam, lam_path, coef, r2s, sig, ridge

    def _step_sizes(self, ctx, model, sels, opt: str, loss_scale: float, lam_path, coef):
        """``(α_k per step before eta_scale, κ, signal share)`` for the optimiser (see ``adam_mapping``)."""
        lrs = np.array([float(ctx.lr_at(k)) for k in range(ctx.max_steps)])
        kappa = share = None
        if opt == "sgd" or self.adam_mapping == "lr":
            return lrs * loss_scale, kappa, share
        kappa, share = self._adam_stats(ctx, model, sels)
        if self.adam_mapping == "init":
            return lrs * loss_scale * kappa, kappa, share
        return adam_path_steps(lrs, lam_path, coef, kappa, share, self.beta2, loss_scale), kappa, share

    def _cache_key(self, sub: dict, f0: torch.Tensor, sels) -> str:
        """Hash of what the θ0 kernel depends on (see ``cache_dir``)."""
        h = hashlib.sha256()
        for k in sorted(sub):
            if k != "labels":
                h.update(k.encode())
                h.update(sub[k].contiguous().numpy().tobytes())
        h.update(f0.contiguous().numpy().tobytes())
        h.update(repr([(s.name, s.shape, s.dim, s.ranges) if hasattr(s, "ranges") else s for s in sels]).encode())
        h.update(f"{self.mode}|{self.sketch_dim if self.mode == 'sketch' else ''}|"
                 f"{self.seed if self.mode == 'sketch' else ''}".encode())
        return h.hexdigest()[:24]

    def _selections(self, ctx):
        from .ntk import select_params
        from .scopes import ParamSelection

        if self.params is not None:
            return select_params(ctx.model, self.params)
        sel = list(ctx.selections or [])
        if sel and all(isinstance(s, ParamSelection) for s in sel):
            return sel
        if sel and all(isinstance(s, str) for s in sel):
            return select_params(ctx.model, sel)
        return select_params(ctx.model, "qkv")

    def _adam_stats(self, ctx, model, sels) -> tuple[float, float]:
        """κ and the signal share w from ``adam_batches`` mini-batch gradients at θ0 (module docstring)."""
        named = dict(model.named_parameters())
        names = list(dict.fromkeys(s.name for s in sels))
        masks = {}
        for s in sels:
            mk = s.mask(named[s.name].device)
            masks[s.name] = masks[s.name] | mk if s.name in masks else mk
        ps = [named[nm] for nm in names]
        req = [p.requires_grad for p in ps]
        dev = ps[0].device
        batch = as_batch(list(ctx.train_batches()))
        n = batch["input_ids"].shape[0]
        B = max(1, int(ctx.batch_size))
        g = torch.Generator().manual_seed(self.seed + 1)
        grads = []
        with eval_mode(model):  # dropout off: the kernel is taken without dropout too
            try:
                for p in ps:
                    p.requires_grad_(True)
                for _ in range(max(2, self.adam_batches)):
                    idx = torch.randperm(n, generator=g)[:B]
                    s = {k: v[idx].to(dev) for k, v in batch.items()}
                    with torch.enable_grad():
                        logits = model(s["input_ids"], s["attention_mask"], s.get("token_type_ids"))
                        y = s["labels"].long()
                        if ctx.loss == "ce":
                            loss = torch.nn.functional.cross_entropy(logits.float(), y)
                        else:
                            oh = torch.nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)
                            loss = 0.5 * ((logits - oh) ** 2).sum(-1).mean()
                        gs = torch.autograd.grad(loss, ps, allow_unused=True)
                    flat = torch.cat([(gg if gg is not None else torch.zeros_like(p))[masks[nm]].double().reshape(-1)
                                      for gg, p, nm in zip(gs, ps, names)])
                    grads.append(flat)
            finally:
                for p, r in zip(ps, req):
                    p.requires_grad_(r)
        G = torch.stack(grads)  # (M, p)
        gbar = G.mean(0)
        v = (G * G).mean(0)
        num = float((gbar * gbar / (v.sqrt() + self.adam_eps)).sum())
        den = float((gbar * gbar).sum())
        kappa = num / den if den > 0 else 0.0
        share = float(den / (G * G).sum(1).mean()) if float((G * G).sum()) > 0 else 1.0
        return kappa, share

    def update(self, step: int, metrics: dict | None) -> StopDecision | None:
        if self.action == "stop" and self.predicted is not None and step >= max(self.predicted, 1) \
                and self.info.stopped_at is None:
            self.info.stopped_at = step
            return StopDecision(f"spectral: predicted stopping step {self.predicted} (η = "
                                f"{self.info.predicted_eta:.4g}, σ = {self.info.sigma:.3g}, R² = {self.info.R2:.4g})",
                                step, step)
        return None

    def eval_steps(self) -> list[int]:
        """The predicted step, so that the learning curve has a measured point exactly there."""
        return [self.predicted] if self.predicted else []

    def summary(self) -> dict:
        return asdict(self.info)

    def state_dict(self) -> dict:
        return {"predicted": self.predicted, "info": asdict(self.info)}

    def load_state_dict(self, state: dict) -> None:
        self.predicted = state.get("predicted")
        if state.get("info"):
            self.info = SpectralSummary(**state["info"])
