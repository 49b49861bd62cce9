"""Spectrum of an empirical NTK: eigenvalues, effective ranks, decay fits, alignment, kernel ridge.

Conventions (``THEORY.md``, "Empirical NTK"): eigenvalues are those of the *normalised* kernel
``K̂ = K / n`` with ``n`` the number of examples (a full multi-output kernel ``(n·o × n·o)`` is also
divided by ``n``, so its ``n·o`` eigenvalues sum to ``(1/n) Σ_i tr K(x_i, x_i)``), sorted in decreasing
order, float64, computed after symmetrising ``(K + Kᵀ)/2``. The centred kernel is ``HKH`` with
``H = I − 11ᵀ/n`` acting on the example index (``H ⊗ I_o`` for a full kernel).

Everything here is a small pure function over tensors/arrays; :func:`spectrum_report` bundles them into
JSON-serialisable dataclasses for ``taskvec ntk`` and the plots of :mod:`taskvec.ntk_plots`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import TaskvecError


class SpectrumError(TaskvecError, ValueError):
    """Bad spectrum request (non-square kernel, too few eigenvalues to fit, ...)."""


# --- eigenvalues ------------------------------------------------------------------------------------------


def _as_matrix(K) -> torch.Tensor:
    K = torch.as_tensor(K).to(torch.float64)
    if K.ndim == 4:  # full (n, n, o, o)
        n1, n2, o1, o2 = K.shape
        K = K.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise SpectrumError(f"kernel must be square (m, m) or full (n, n, o, o), got shape {tuple(K.shape)}")
    return K


def center_kernel(K, o: int = 1) -> torch.Tensor:
    """``(H ⊗ I_o) K (H ⊗ I_o)`` for a 2-D kernel of ``n·o`` rows ordered example-major (float64)."""
    K = _as_matrix(K)
    m = K.shape[0]
    if m % o:
        raise SpectrumError(f"kernel size {m} is not a multiple of o = {o}")
    n = m // o
    K4 = K.reshape(n, o, n, o)
    K4 = K4 - K4.mean(0, keepdim=True)
    K4 = K4 - K4.mean(2, keepdim=True)
    return K4.reshape(m, m)


def eigenvalues(K, n: int | None = None, centered: bool = False, o: int = 1,
                vectors: bool = False):
    """Eigenvalues (decreasing) of ``K/n`` in float64, after symmetrising (and centring if asked).

    Args:
        K: ``(m, m)`` kernel with ``m = n·o`` (example-major), or a full ``(n, n, o, o)`` kernel.
        n: examples (default ``m / o``; for a 4-D kernel its ``n`` and ``o`` are used).
    Returns:
        ``lam`` (m,) float64 tensor, or ``(lam, U)`` with eigenvectors as columns when ``vectors``.
    """
    K = torch.as_tensor(K)
    if K.ndim == 4:
        o = K.shape[2]
    K = _as_matrix(K)
    n = n or K.shape[0] // o
    K = 0.5 * (K + K.T)
    if centered:
        K = center_kernel(K, o)
    if vectors:
        lam, U = torch.linalg.eigh(K / n)
        return lam.flip(0), U.flip(1)
    return torch.linalg.eigvalsh(K / n).flip(0)


def top_eigenvalues_from_features(F, r: int, n: int | None = None, centered: bool = False,
                                  oversample: int = 10, niter: int = 4, seed: int = 0) -> torch.Tensor:
    """Top ``r`` eigenvalues of ``F Fᵀ / n`` from the feature factor, by randomised SVD.

    Args:
        F: features ``(n, d)`` or ``(n, o, d)`` (rows ``φ(x_i)[a]``; e.g. sketched Jacobians).
        r: eigenvalues wanted; ``oversample``/``niter``: randomised-SVD accuracy (Halko et al.).
        centered: centre the features over examples first (eigenvalues of ``HKH / n``).
    Returns:
        ``(r,)`` float64, decreasing.
    """
    F = torch.as_tensor(F).to(torch.float64)
    if F.ndim == 2:
        F = F[:, None, :]
    nn_, o, d = F.shape
    n = n or nn_
    if centered:
        F = F - F.mean(0, keepdim=True)
    M = F.reshape(nn_ * o, d)
    r = min(r, min(M.shape))
    q = min(r + oversample, min(M.shape))
    if q >= min(M.shape) // 2:  # small enough: exact thin SVD
        S = torch.linalg.svdvals(M)
    else:
        torch.manual_seed(seed)
        _, S, _ = torch.svd_lowrank(M, q=q, niter=niter)
    return (S[:r] ** 2 / n).to(torch.float64)


# --- effective ranks -----------------------------------------------------------------------------------------


@dataclass
class EffectiveRanks:
    """Effective ranks of a spectrum (``THEORY.md``): participation ratio ``(Σλ)²/Σλ²``, entropy rank
    ``exp(−Σ p log p)`` with ``p = λ/Σλ``, stable rank ``Σλ/λ1``, and ``k90``/``k99`` (eigenvalues needed
    for 90% / 99% of the trace). Negative round-off eigenvalues are clipped to 0."""

    participation_ratio: float
    entropy_rank: float
    stable_rank: float
    k90: int
    k99: int


def effective_ranks(lam) -> EffectiveRanks:
    lam = np.clip(np.asarray(lam, dtype=np.float64), 0, None)
    lam = np.sort(lam)[::-1]
    s = lam.sum()
    if s <= 0:
        return EffectiveRanks(0.0, 0.0, 0.0, 0, 0)
    p = lam / s
    nz = p[p > 0]
    cum = np.cumsum(p)
    return EffectiveRanks(
        participation_ratio=float(s**2 / (lam**2).sum()),
        entropy_rank=float(np.exp(-(nz * np.log(nz)).sum())),
        stable_rank=float(s / lam[0]),
        k90=int(np.searchsorted(cum, 0.9 - 1e-12) + 1),
        k99=int(np.searchsorted(cum, 0.99 - 1e-12) + 1),
    )


# --- decay fits --------------------------------------------------------------------------------------------


@dataclass
class DecayFit:
    """Fits of the eigenvalue decay over the window ``i ∈ [start, stop]`` (1-based indices).

    Power law ``log λ_i = c − α log i`` (``alpha``, ``log_c``, ``r2``); exponential ``log λ_i = c' − β i``
    (``exp_rate`` = β, ``exp_r2``); ``better`` names the fit with the higher R². ``floor`` is the value
    below which eigenvalues were treated as numerical/sketch noise; ``alpha_ci`` a bootstrap interval
    (see :func:`bootstrap_alpha`) when computed. ``rate_exponent`` = ``α/(α+1)``: the squared-error rate
    ``n^(−α/(α+1))`` that ``λ_j ∝ j^(−α)`` predicts (``THEORY.md``, spectral early stopping).
    """

    alpha: float
    log_c: float
    r2: float
    start: int
    stop: int
    exp_rate: float
    exp_log_c: float
    exp_r2: float
    better: str
    floor: float
    rate_exponent: float
    alpha_ci: list | None = None
    ci_level: float | None = None
    num_boot: int | None = None


def _linfit(x, y):
    A = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    pred = A @ coef
    ss = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - ((y - pred) ** 2).sum() / ss if ss > 0 else 1.0
    return coef, float(r2)


def fit_window(lam, skip: int = 3, floor_rel: float = 1e-12, floor_abs: float | None = None,
               max_fraction: float = 0.5, window: tuple[int, int] | None = None) -> tuple[int, int, float]:
    """1-based inclusive fit window ``(start, stop)`` and the floor used.

    Starts after the top ``skip`` eigenvalues; stops before the first eigenvalue under the floor
    ``max(floor_rel·λ1, floor_abs)`` (numerical noise: ``1e-12·λ1`` in float64; for a sketch pass
    :func:`sketch_floor`) and at most at ``max_fraction`` of the spectrum (the finite-sample tail is biased
    low). ``window`` overrides.
    """
    lam = np.asarray(lam, dtype=np.float64)
    floor = max(floor_rel * float(lam[0]), floor_abs or 0.0)
    if window is not None:
        return int(window[0]), int(window[1]), floor
    below = np.nonzero(lam <= floor)[0]
    stop = int(below[0]) if below.size else lam.size  # count of eigenvalues above the floor
    stop = min(stop, max(skip + 3, int(math.ceil(max_fraction * lam.size))))
    return skip + 1, stop, floor


def sketch_floor(lam, k: int, c: float = 2.0) -> float:
    """Eigenvalue level below which a rank-``k`` sketch is noise: ``c·‖λ‖₂/√k`` (the Frobenius-norm error
    of a ``k``-dimensional random projection of the kernel; a heuristic, not a bound)."""
    lam = np.clip(np.asarray(lam, dtype=np.float64), 0, None)
    return float(c * np.sqrt((lam**2).sum()) / math.sqrt(k))


def fit_decay(lam, skip: int = 3, floor_rel: float = 1e-12, floor_abs: float | None = None,
              max_fraction: float = 0.5, window: tuple[int, int] | None = None) -> DecayFit:
    """Power-law and exponential fits of decreasing eigenvalues ``lam`` over :func:`fit_window`."""
    lam = np.sort(np.asarray(lam, dtype=np.float64))[::-1]
    start, stop, floor = fit_window(lam, skip, floor_rel, floor_abs, max_fraction, window)
    idx = np.arange(start, stop + 1)
    if idx.size < 3 or np.any(lam[idx - 1] <= 0):
        raise SpectrumError(f"decay fit needs >= 3 positive eigenvalues in the window [{start}, {stop}] "
                            f"(floor {floor:.3g}, {lam.size} eigenvalues); lower skip or the floor")
    y = np.log(lam[idx - 1])
    (c, slope), r2 = _linfit(np.log(idx), y)
    (ce, se), r2e = _linfit(idx.astype(np.float64), y)
    alpha = -float(slope)
    return DecayFit(alpha=alpha, log_c=float(c), r2=r2, start=int(start), stop=int(stop), exp_rate=-float(se),
                    exp_log_c=float(ce), exp_r2=r2e, better="power" if r2 >= r2e else "exponential",
                    floor=floor, rate_exponent=alpha / (alpha + 1) if alpha > -1 else float("nan"))


def bootstrap_alpha(K, o: int = 1, num_boot: int = 200, fraction: float = 0.8, level: float = 0.9,
                    seed: int = 0, centered: bool = False, **fit_kw) -> tuple[list, np.ndarray]:
    """Bootstrap interval for the power-law exponent α over examples.

    Each replicate draws ``m = fraction·n`` *distinct* examples (a subsampling bootstrap: resampling with
    replacement would duplicate rows and add exact zero eigenvalues), takes the sub-kernel, and refits
    over the same rule (:func:`fit_decay` with ``fit_kw``). Returns ``([lo, hi], alphas)`` with the
    ``level`` percentile interval.
    """
    K = _as_matrix(K)
    n = K.shape[0] // o
    m = max(4, int(round(fraction * n)))
    rng = np.random.default_rng(seed)
    K4 = K.reshape(n, o, n, o)
    alphas = []
    for _ in range(num_boot):
        idx = torch.as_tensor(np.sort(rng.choice(n, size=m, replace=False)))
        sub = K4[idx][:, :, idx].reshape(m * o, m * o)
        try:
            alphas.append(fit_decay(eigenvalues(sub, m, centered, o).numpy(), **fit_kw).alpha)
        except SpectrumError:
            continue
    a = np.asarray(alphas)
    if a.size == 0:
        return [float("nan"), float("nan")], a
    q = (1 - level) / 2
    return [float(np.quantile(a, q)), float(np.quantile(a, 1 - q))], a


# --- alignment and kernel ridge -----------------------------------------------------------------------------


def _onehot(y, num_classes=None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2:
        return y.astype(np.float64)
    C = int(num_classes or y.max() + 1)
    return np.eye(C)[y.astype(int)]


def kernel_target_alignment(K, y, centered: bool = True, num_classes: int | None = None) -> float:
    """(Centred) kernel-target alignment ``<K_c, Y_c Y_cᵀ>_F / (‖K_c‖_F ‖Y_c Y_cᵀ‖_F)`` (Cortes et al. 2012)
    for an ``(n, n)`` kernel and labels ``y (n,)`` (one-hot) or targets ``Y (n, C)``."""
    K = _as_matrix(K).numpy()
    Y = _onehot(y, num_classes)
    if centered:
        H = np.eye(K.shape[0]) - 1.0 / K.shape[0]
        K = H @ K @ H
        Y = Y - Y.mean(0)
    T = Y @ Y.T
    den = np.linalg.norm(K) * np.linalg.norm(T)
    return float((K * T).sum() / den) if den > 0 else 0.0


def kernel_ridge_predict(K_train, Y_train, K_test_train, ridge: float) -> np.ndarray:
    """Kernel ridge predictions ``K_* (K + ridge·n·I)⁻¹ Y`` (``ridge`` relative to ``K/n``)."""
    K = _as_matrix(K_train).numpy()
    n = K.shape[0]
    A = 0.5 * (K + K.T) + ridge * n * np.eye(n)
    return np.asarray(K_test_train, dtype=np.float64) @ np.linalg.solve(A, Y_train)


def kernel_ridge_cv(K, y, ridges=None, folds: int = 5, seed: int = 0, num_classes: int | None = None,
                    offset=None) -> dict:
    """Choose the ridge by ``folds``-fold cross-validation on the training kernel.

    Regresses one-hot targets (minus ``offset (n, C)``, e.g. the base model's logits for a warm start).
    Returns ``{"ridge", "cv_accuracy", "cv_mse", "residual_var", "per_ridge"}``; ``residual_var`` is the
    cross-validated mean squared residual per output at the chosen ridge (used as σ² by
    :mod:`taskvec.spectral`).
    """
    K = _as_matrix(K).numpy()
    Y = _onehot(y, num_classes)
    target = Y - (np.asarray(offset, dtype=np.float64) if offset is not None else 0.0)
    n = K.shape[0]
    ridges = list(ridges) if ridges is not None else [10.0**e for e in range(-6, 2)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    parts = np.array_split(perm, min(folds, n))
    res = []
    for r in ridges:
        pred = np.zeros_like(target)
        for te in parts:
            tr = np.setdiff1d(perm, te)
            pred[te] = kernel_ridge_predict(K[np.ix_(tr, tr)], target[tr], K[np.ix_(te, tr)], r)
        full = pred + (np.asarray(offset) if offset is not None else 0.0)
        mse = float(((pred - target) ** 2).mean())
        acc = float((full.argmax(1) == Y.argmax(1)).mean())
        res.append({"ridge": r, "cv_mse": mse, "cv_accuracy": acc})
    best = min(res, key=lambda d: d["cv_mse"])
    return {"ridge": best["ridge"], "cv_accuracy": best["cv_accuracy"], "cv_mse": best["cv_mse"],
            "residual_var": best["cv_mse"], "per_ridge": res}


def kernel_ridge_accuracy(K_train, y_train, K_test_train, y_test, ridge: float | None = None,
                          num_classes: int | None = None, folds: int = 5) -> dict:
    """Test accuracy of kernel ridge regression on one-hot targets (a sanity check of the kernel).

    ``ridge`` (relative to ``K/n``) is chosen by :func:`kernel_ridge_cv` when not given.
    """
    C = int(num_classes or max(np.max(y_train), np.max(y_test)) + 1)
    if ridge is None:
        ridge = kernel_ridge_cv(K_train, y_train, folds=folds, num_classes=C)["ridge"]
    pred = kernel_ridge_predict(K_train, _onehot(y_train, C), K_test_train, ridge)
    return {"ridge": ridge, "accuracy": float((pred.argmax(1) == np.asarray(y_test)).mean())}


# --- report --------------------------------------------------------------------------------------------------


@dataclass
class SpectrumSummary:
    """One spectrum (centred or not): eigenvalues of ``K/n`` (decreasing; at most ``max_eigenvalues``
    stored), their sum (the full trace of ``K/n``), effective ranks and decay fit."""

    centered: bool
    n: int
    o: int
    trace: float
    eigenvalues: list
    ranks: EffectiveRanks
    decay: DecayFit | None
    decay_error: str | None = None


@dataclass
class SpectrumReport:
    """Spectra (uncentred and centred) of one kernel, plus alignment and kernel-ridge sanity checks.
    ``group_traces`` maps parameter groups (``"3.q"``) to their share of the trace. Serialise with
    :meth:`to_json`, read back with :meth:`from_json`."""

    uncentered: SpectrumSummary
    centered: SpectrumSummary
    kind: str = "trace"
    alignment: float | None = None
    kernel_ridge: dict | None = None
    group_traces: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SpectrumReport":
        def summ(s):
            s = dict(s)
            s["ranks"] = EffectiveRanks(**s["ranks"])
            s["decay"] = DecayFit(**s["decay"]) if s.get("decay") else None
            return SpectrumSummary(**s)

        d = dict(d)
        d["uncentered"], d["centered"] = summ(d["uncentered"]), summ(d["centered"])
        return cls(**d)


def summarize(lam, n: int, o: int, centered: bool, max_eigenvalues: int = 4096, **fit_kw) -> SpectrumSummary:
    lam = np.sort(np.asarray(lam, dtype=np.float64))[::-1]
    try:
        fit, err = fit_decay(lam, **fit_kw), None
    except SpectrumError as e:
        fit, err = None, str(e)
    return SpectrumSummary(centered, n, o, float(lam.sum()), lam[:max_eigenvalues].tolist(),
                           effective_ranks(lam), fit, err)


def spectrum_report(K, kind: str = "trace", labels=None, groups: dict | None = None, num_boot: int = 0,
                    sketch_dim: int | None = None, max_eigenvalues: int = 4096, seed: int = 0,
                    **fit_kw) -> SpectrumReport:
    """Everything about one symmetric kernel.

    Args:
        K: ``(n, n)`` trace kernel or ``(n, n, o, o)`` full kernel (or an :class:`~taskvec.ntk.NTKResult`).
        labels: ``(n,)`` class labels for alignment and kernel-ridge CV accuracy (trace-averaged kernel).
        groups: group label -> kernel, for the per-group trace shares.
        num_boot: bootstrap replicates for the α interval (0 = skip).
        sketch_dim: if the kernel is sketched, its ``k`` (sets the fit floor by :func:`sketch_floor`).
        fit_kw: passed to :func:`fit_decay` (``skip``, ``floor_rel``, ``max_fraction``, ``window``).
    """
    meta: dict = {}
    if hasattr(K, "kernel"):  # NTKResult
        res = K
        K, kind, groups = res.kernel, res.kind, (groups if groups is not None else res.groups)
        sketch_dim = sketch_dim or res.sketch_dim
        meta = res.meta()
    K = torch.as_tensor(K).to(torch.float64)
    if kind == "diagonal":
        K, kind = K.mean(-1), "trace"
    o = K.shape[2] if K.ndim == 4 else 1
    M = _as_matrix(K)
    n = M.shape[0] // o
    out = []
    for centered in (False, True):
        lam = eigenvalues(M, n, centered, o).numpy()
        kw = dict(fit_kw)
        if sketch_dim and "floor_abs" not in kw:
            kw["floor_abs"] = sketch_floor(lam, sketch_dim)
        s = summarize(lam, n, o, centered, max_eigenvalues, **kw)
        if num_boot and s.decay is not None:
            ci, a = bootstrap_alpha(M, o, num_boot, seed=seed, centered=centered, **kw)
            s.decay.alpha_ci, s.decay.ci_level, s.decay.num_boot = ci, 0.9, int(a.size)
        out.append(s)
    rep = SpectrumReport(out[0], out[1], kind, meta=meta)
    if groups:
        tot = float(torch.diagonal(M).sum())
        rep.group_traces = {g: float(torch.diagonal(_as_matrix(torch.as_tensor(v))).sum()) / tot
                            for g, v in groups.items()}
    if labels is not None:
        Kt = K if K.ndim == 2 else torch.diagonal(K, dim1=2, dim2=3).mean(-1)
        y = np.asarray(labels)
        rep.alignment = kernel_target_alignment(Kt, y)
        cv = kernel_ridge_cv(Kt, y, seed=seed)
        rep.kernel_ridge = {k: v for k, v in cv.items() if k != "per_ridge"}
    return rep
