"""More merge methods, with mergekit's semantics and parameter names: spherical ones (``slerp``, ``nuslerp``,
``multislerp``, ``karcher``), ``model_stock``, DELLA (``della``, ``della_linear``), ``sce`` and ``nearswap``.

Same contract as :mod:`taskvec.merge.methods`: ``fn(base, deltas, weights, **params) -> Δ`` on whole
tensors, the merged tensor being θ0 + Δ; methods that interpolate weights return (interpolated − θ0).
taskvec always has a base θ0, so mergekit's base-less forms are read as follows:

* ``slerp`` and ``nearswap`` pair the base with ONE other model: list that model (or the base and that
  model; the input whose τ is all zero on a tensor is then taken to be the base there);
* ``nuslerp`` and ``multislerp`` work on task vectors around the base (mergekit's form with a base);
* ``karcher`` averages the listed models' weights θ_t (mergekit: "no base_model is used").

Scalar reductions (norms, dot products) are accumulated in float64. See ``docs/merge.md``, "More methods",
for the definitions and where they differ from mergekit.
"""

from __future__ import annotations

import math

import torch

from .methods import (
    INT8_MASK,
    LAMBDA,
    SEED,
    WEIGHT,
    MergeError,
    Method,
    Param,
    _boolean,
    _in_half_open,
    _in_unit,
    _normalize,
    _number,
    _rescale_param,
    combine,
    register,
    rescale_kept,
    topk_mask,
)

F64 = torch.float64
SLERP_DOT_THRESHOLD = 0.9995  # |cos| above it: (nearly) colinear, lerp instead (mergekit's)
SLERP_EPS = 1e-8  # slerp: a tensor is normalised only if its norm exceeds this (mergekit's)
NUSLERP_EPS = 1e-8  # nuslerp: |sin θ| below it: colinear rows, lerp (mergekit's)


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=F64))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(dtype=F64))


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1, dtype=F64)


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, dtype=F64)


def _the_other(method: str, deltas: list[torch.Tensor]) -> torch.Tensor:
    """τ of the secondary model of a two-model method: the only input, or of two inputs the one whose τ is
    not all zero (the other is the base listed as a model)."""
    if len(deltas) == 1:
        return deltas[0]
    moved = [d for d in deltas if bool(d.ne(0).any())]
    if len(deltas) == 2 and len(moved) < 2:
        return moved[0] if moved else deltas[0]
    raise MergeError(f"{method} merges the base with exactly one other model: list that model (or the base and "
                     f"that model); got {len(deltas)} models, {len(moved)} of which differ from the base")


# --- spherical interpolation ------------------------------------------------------------------------


def slerp(base, deltas, weights, *, t=0.5):
    """SLERP between the base θ0 (t = 0) and the other model θ1 = θ0 + τ (t = 1), on whole tensors.

    cos = ⟨θ0/‖θ0‖, θ1/‖θ1‖⟩ (a tensor of norm ≤ 1e-8 is not normalised); if |cos| > 0.9995 the lerp
    (1−t)·θ0 + t·θ1; else, with Ω = arccos(cos), sin((1−t)Ω)/sin Ω·θ0 + sin(tΩ)/sin Ω·θ1.

    Args:
        base: θ0, shape S. deltas: one τ (or two, one of them all zero: the base listed as a model).
        weights: ignored (mergekit's slerp has none). t: the interpolation factor (any real).
    Returns:
        Δ = result − θ0, shape S.
    """
    return slerp_apply(base, deltas, slerp_finish(slerp_stats(base, deltas), t=t))


def slerp_stats(base, deltas) -> torch.Tensor:
    """The sums slerp needs, additive over any split of the entries (the engine streams them by chunk):
    ``[Σθ0², then per input: Σθ_t², Σθ0·θ_t, #(τ_t ≠ 0)]`` with θ_t = θ0 + τ_t, returned in float64.

    From three dot products per input and no temporaries: Σθ_t² = Σθ0² + 2·Σθ0·τ_t + Στ_t² and
    Σθ0·θ_t = Σθ0² + Σθ0·τ_t; each dot accumulates in the inputs' dtype over one chunk (the engine's
    chunks are 2¹⁸ entries; mergekit takes the norms of whole tensors in float32) and the chunks add in
    float64."""
    def dot(a, b):
        return torch.dot(a.reshape(-1), b.reshape(-1)).to(F64)

    b2 = dot(base, base)
    out = [b2]
    for d in deltas:
        bd = dot(base, d)
        out += [b2 + 2 * bd + dot(d, d), b2 + bd, torch.count_nonzero(d).to(F64)]
    return torch.stack(out)


def slerp_finish(stats: torch.Tensor, *, t=0.5) -> tuple[int, float, float]:
    """``(k, a, b)`` from :func:`slerp_stats` summed over the whole tensor: Δ = a·τ_k + b·θ0."""
    T = (len(stats) - 1) // 3
    moved = [i for i in range(T) if float(stats[3 + 3 * i]) > 0]
    if T == 1 or (T == 2 and len(moved) < 2):
        k = moved[0] if moved and T == 2 else 0
    else:
        raise MergeError(f"slerp merges the base with exactly one other model: list that model (or the base and "
                         f"that model); got {T} models, {len(moved)} of which differ from the base")
    n0, n1 = math.sqrt(float(stats[0])), math.sqrt(float(stats[1 + 3 * k]))
    cos = float(stats[2 + 3 * k]) / ((n0 if n0 > SLERP_EPS else 1.0) * (n1 if n1 > SLERP_EPS else 1.0))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return k, t, 0.0
    omega = math.acos(cos)
    s = math.sin(omega)
    s0, s1 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
    return k, s1, s0 + s1 - 1  # s0·θ0 + s1·(θ0 + τ) − θ0, without forming θ1 − θ0 again


def slerp_apply(base, deltas, coef: tuple[int, float, float]) -> torch.Tensor:
    """Δ = a·τ_k + b·θ0 on any slice of the tensor (``coef`` from :func:`slerp_finish`)."""
    k, a, b = coef
    out = deltas[k] * a
    return out if b == 0.0 else out.add_(base, alpha=b)


def _as_rows(x: torch.Tensor, flatten: bool, row_wise: bool):
    """``x`` as a 2-D (vectors × entries) tensor for nuslerp, and the function mapping rows back."""
    shape = x.shape
    if flatten or x.ndim < 2:
        return x.reshape(1, -1), lambda r: r.reshape(shape)
    if row_wise:  # mergekit's row_wise: vectors along dim 0 (transpose(0, -1), then the last dim)
        y = x.transpose(0, -1)
        inner = y.shape
        return y.reshape(-1, inner[-1]), lambda r: r.reshape(inner).transpose(0, -1).contiguous()
    return x.reshape(-1, shape[-1]), lambda r: r.reshape(shape)


def slerp_rows(t: float, x0: torch.Tensor, x1: torch.Tensor, eps: float = NUSLERP_EPS) -> torch.Tensor:
    """Row-by-row slerp of two (k, d) tensors (mergekit's nuslerp kernel).

    Per row: cos = ⟨x0, x1⟩ / (max(‖x0‖, 1e-7)·max(‖x1‖, 1e-7)) clamped to [−1, 1], Ω = arccos(cos);
    (sin((1−t)Ω)·x0 + sin(tΩ)·x1) / sin Ω, or (1−t)·x0 + t·x1 where |sin Ω| < eps.
    """
    n0, n1 = _row_norms(x0).clamp(min=1e-7), _row_norms(x1).clamp(min=1e-7)
    omega = torch.acos((_row_dots(x0, x1) / (n0 * n1)).clamp(-1, 1))
    s = torch.sin(omega)
    colinear = s.abs() < eps
    c0 = torch.where(colinear, torch.full_like(s, 1 - t), torch.sin((1 - t) * omega) / s)
    c1 = torch.where(colinear, torch.full_like(s, t), torch.sin(t * omega) / s)
    return x0 * c0.unsqueeze(-1).to(x0.dtype) + x1 * c1.unsqueeze(-1).to(x0.dtype)


def nuslerp(base, deltas, weights, *, nuslerp_flatten=True, nuslerp_row_wise=False):
    """NuSLERP: slerp of the two task vectors around the base, t = w_1 / (w_0 + w_1) (0.5 if |Σw| < 1e-6).

    With ``nuslerp_flatten`` (default) each tensor is one vector; otherwise every row is slerped on its
    own (vectors along the last dim; with ``nuslerp_row_wise``, along dim 0, as mergekit's code does).
    One input: its τ (mergekit: a single tensor is returned as is).

    Args:
        base: θ0, shape S (unused). deltas: two τ of shape S. weights: two floats.
    Returns:
        Δ, shape S.
    """
    if len(deltas) == 1:
        return deltas[0]
    if len(deltas) != 2:
        raise MergeError(f"nuslerp merges exactly two models (around the base); got {len(deltas)}")
    total = float(weights[0]) + float(weights[1])
    t = 0.5 if abs(total) < 1e-6 else float(weights[1]) / total
    r0, back = _as_rows(deltas[0], nuslerp_flatten, nuslerp_row_wise)
    r1, _ = _as_rows(deltas[1], nuslerp_flatten, nuslerp_row_wise)
    return back(slerp_rows(t, r0, r1))


def multislerp(base, deltas, weights, *, normalize_weights=True, eps=1e-8):
    """Multi-SLERP (mergekit): barycentric spherical interpolation of the task vectors around the base.

    With w_t normalised to sum 1 (``normalize_weights``), n_t = ‖τ_t‖ and unit vectors u_t = τ_t/(n_t + eps):
    M = Σ w_t u_t, m = M/‖M‖; mergekit then maps the weighted mean of the u_t's tangent projections at m
    back to the sphere, but that weighted mean is Σ w_t (u_t − ⟨u_t, m⟩ m) = M − ‖M‖ m = 0 identically, so
    the result is exactly Δ = (Σ w_t n_t)·m, computed here in closed form. If ‖M‖ < eps: two models
    give the lerp w_0 τ_0 + w_1 τ_1, all-zero τ give 0, otherwise :class:`MergeError` (antipodal inputs
    whose weights cancel).

    Args:
        base: θ0, shape S (unused). deltas: T τ of shape S. weights: T floats.
    Returns:
        Δ, shape S.
    """
    T = len(deltas)
    if T == 1:
        return deltas[0]
    w = [float(x) for x in weights]
    if normalize_weights:
        total = sum(w)
        if abs(total) < 1e-12:
            raise MergeError(f"multislerp: the weights {w} sum to 0 and cannot be normalized "
                             "(set normalize_weights: false or change them)")
        w = [x / total for x in w]
    norms = [_norm(d) for d in deltas]
    if all(n == 0 for n in norms):
        return torch.zeros_like(deltas[0])
    M = deltas[0] * (w[0] / (norms[0] + eps))
    for d, wi, n in zip(deltas[1:], w[1:], norms[1:]):
        M.add_(d, alpha=wi / (n + eps))
    m_norm = _norm(M)
    if m_norm < eps:
        if T == 2:
            return (deltas[0] * w[0]).add_(deltas[1], alpha=w[1])
        raise MergeError("multislerp: the weighted mean of the unit task vectors is zero (antipodal task "
                         "vectors with weights that balance out); change the weights")
    return M.mul_(sum(wi * n for wi, n in zip(w, norms)) / m_norm)


def karcher(base, deltas, weights, *, max_iter=10, tol=1e-5, include_base=True):
    """Karcher (Riemannian) mean of the models' weights θ_t = θ0 + τ_t on the sphere, rescaled (mergekit's).

    Directions u_t = θ_t/‖θ_t‖ of the models with ‖θ_t‖ > tol, weights a_t = w_t/Σw (renormalised over
    them); start at the normalised Σ a_t u_t and iterate at most ``max_iter`` times: the tangent
    T = Σ a_t (Ω_t / sin Ω_t)(u_t − cos Ω_t·u) over the u_t with Ω_t = arccos⟨u, u_t⟩ ≥ tol; stop if
    ‖T‖ < tol, else u ← normalise(cos‖T‖·u + sin‖T‖·T/‖T‖). Result s·u with s = Σ_t (w_t/Σw)·‖θ_t‖.
    mergekit weighs the models equally (the default weights 1). With ``include_base`` (default, as mergekit
    0.1.5 does whenever a ``base_model`` is given) the base θ0 is one more point of the mean, of weight 1.

    Args:
        base: θ0, shape S. deltas: T τ of shape S (overwritten). weights: T floats ≥ 0, Σ > 0.
    Returns:
        Δ = s·u − θ0, shape S.
    """
    if include_base:
        deltas, weights = [torch.zeros_like(base), *deltas], [1.0, *weights]
    if len(deltas) == 1:
        return deltas[0]
    w = [float(x) for x in weights]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise MergeError(f"karcher: weights must be ≥ 0 with a positive sum; got {w}")
    alphas = [x / sum(w) for x in w]
    points = [d.add_(base).reshape(-1) for d in deltas]  # θ_t, in place
    norms = [_norm(p) for p in points]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return -base
    units = [points[i].div_(norms[i]) for i in valid]
    a_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / a_sum for i in valid]
    u = units[0] * a[0]
    for ai, ui in zip(a[1:], units[1:]):
        u.add_(ui, alpha=ai)
    n_u = _norm(u)
    u = units[0].clone() if n_u < tol else u.div_(n_u)
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(u)
        for ai, ui in zip(a, units):
            cos = min(1.0, max(-1.0, _dot(u, ui)))
            omega = math.acos(cos)
            if omega < tol:
                continue
            c = ai * omega / math.sin(omega)
            tangent.add_(ui, alpha=c).add_(u, alpha=-c * cos)
        n_t = _norm(tangent)
        if n_t < tol:
            break
        u = u.mul_(math.cos(n_t)).add_(tangent, alpha=math.sin(n_t) / n_t)
        n_u = _norm(u)
        if n_u > tol:
            u.div_(n_u)
    s = sum(al * n for al, n in zip(alphas, norms))
    return u.mul_(s).reshape(base.shape).sub_(base)


# --- model stock ----------------------------------------------------------------------------------


def model_stock(base, deltas, weights, *, filter_wise=False):
    """Model Stock: Δ = t·mean_t(τ_t), t = N·cos / (1 + (N−1)·cos), cos = mean pairwise cosine of the τ_t.

    cos_ij = ⟨τ_i, τ_j⟩ / max(‖τ_i‖‖τ_j‖, 1e-6) clamped to [−1, 1], over the whole tensor, or per row
    (vectors along the last dim; a 1-D tensor is one row) with ``filter_wise``. So θ0 + Δ =
    t·mean(θ_t) + (1−t)·θ0. One model: its τ (mergekit needs two besides the base).

    Args:
        base: θ0, shape S (unused). deltas: T τ of shape S. weights: ignored (mergekit's has none).
    Returns:
        Δ, shape S.
    """
    N = len(deltas)
    if N == 1:
        return deltas[0]
    shape = deltas[0].shape
    if not filter_wise or deltas[0].ndim < 2:
        return model_stock_apply(base, deltas, model_stock_finish(model_stock_stats(base, deltas)))
    rows = [d.reshape(-1, shape[-1]) for d in deltas]
    norms = [_row_norms(r) for r in rows]
    cos = torch.zeros_like(norms[0])
    for i in range(N):
        for j in range(i + 1, N):
            cos += (_row_dots(rows[i], rows[j]) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
    return _stock_mean(rows, _stock_t(cos, N).unsqueeze(-1)).reshape(shape)


def _stock_t(cos_sum: torch.Tensor, N: int) -> torch.Tensor:
    cos = cos_sum / (N * (N - 1) / 2)
    return N * cos / (1 + (N - 1) * cos)


def _stock_mean(rows: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    mean = rows[0].clone()
    for r in rows[1:]:
        mean.add_(r)
    return mean.mul_((t / len(rows)).to(mean.dtype))


def model_stock_stats(base, deltas) -> torch.Tensor:
    """The sums model_stock (whole-tensor form) needs, additive over any split of the entries: float64
    ``[‖τ_i‖² for each i, then ⟨τ_i, τ_j⟩ for i < j]``."""
    out = [(d * d).sum(dtype=F64) for d in deltas]
    out += [(deltas[i] * deltas[j]).sum(dtype=F64) for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    return torch.stack(out)


def model_stock_finish(stats: torch.Tensor, *, filter_wise=False) -> torch.Tensor:
    """The interpolation factor t (a float64 scalar tensor) from :func:`model_stock_stats` of the whole tensor
    (the whole-tensor form only: ``filter_wise`` must be false)."""
    assert not filter_wise, "filter_wise model_stock does not stream"
    N = 1
    while N + N * (N - 1) // 2 < len(stats):
        N += 1
    norms = stats[:N].sqrt()
    cos = torch.zeros((), dtype=F64)
    c = N
    for i in range(N):
        for j in range(i + 1, N):
            cos = cos + (stats[c] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            c += 1
    return _stock_t(cos, N)


def model_stock_apply(base, deltas, t: torch.Tensor) -> torch.Tensor:
    """Δ = t·mean(τ) on any slice of the tensor (``t`` from :func:`model_stock_finish`)."""
    return deltas[0].clone() if len(deltas) == 1 else _stock_mean(list(deltas), t)


# --- DELLA ------------------------------------------------------------------------------------------


def della_keep_probs(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of each entry: (density − ε) + 2ε·r/(n−1), r = rank of |x| within its row.

    Rows are along dim 1 (a 1-D tensor is one row, as in mergekit); r = 0 for the smallest magnitude,
    equal magnitudes ranked by index; a row of one entry gets p = density.
    """
    rows = x.reshape(1, -1) if x.ndim < 2 else x
    n = rows.shape[1]
    dtype = x.dtype if x.dtype in (torch.float32, F64) else torch.float32
    if n < 2:
        return torch.full(x.shape, density, dtype=dtype, device=x.device)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    # the inverse permutation (rank of each entry) by one scatter instead of a second sort: the same ranks
    ranks = torch.empty(order.shape, dtype=dtype, device=x.device)
    pos = torch.arange(n, dtype=dtype, device=x.device).view([1, n] + [1] * (order.ndim - 2))
    ranks.scatter_(1, order, pos.expand(order.shape))
    return ((density - epsilon) + ranks * (2 * epsilon / (n - 1))).reshape(x.shape)


def della_prune(x: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                rescale) -> torch.Tensor:
    """DELLA's MAGPRUNE: keep each entry with its :func:`della_keep_probs` probability, then rescale.

    Args:
        x: tensor of any shape. density: in (0, 1]; 1 returns ``x`` unchanged. epsilon: with
            0 < density − ε and density + ε < 1.
        generator: CPU generator; the uniform draws are ``torch.rand(x.shape)`` as in DARE, so ε = 0
            gives DARE's mask exactly.
        rescale: ``True``/``"l1"`` (mergekit: keep the L1 norm), ``"density"`` (×1/p per entry: the
            paper's, E[result] = x), ``False``.
    Returns:
        tensor of ``x``'s shape and dtype.
    """
    if density >= 1:
        return x
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise MergeError(f"della: density ± epsilon must lie in (0, 1); got density {density}, epsilon {epsilon}")
    work = x if x.dtype in (torch.float32, F64) else x.float()
    p = della_keep_probs(work, density, epsilon)
    keep = (torch.rand(work.shape, generator=generator, dtype=work.dtype).to(work.device) < p)
    return rescale_kept(work, work * keep, p, rescale).to(x.dtype)


def _della(deltas, density, epsilon, seed, rescale):
    out = []
    for t, (d, p, e) in enumerate(zip(deltas, density, epsilon)):
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + t) % (1 << 63))
        out.append(della_prune(d, p, e, g, rescale))
    return out


def della(base, deltas, weights, *, density, epsilon, rescale=True, normalize=True, lambda_=1.0, seed=0):
    """DELLA: MAGPRUNE each τ_t (:func:`della_prune`), then TIES sign election and the disjoint weighted
    merge of :func:`~taskvec.merge.methods.combine`.

    Args:
        base: θ0, shape S (unused). deltas: T τ of shape S. weights: T floats.
        density, epsilon: T floats each. seed: int (per tensor, from the engine).
    Returns:
        Δ, shape S.
    """
    return combine(_della(deltas, density, epsilon, seed, rescale), weights, consensus=True,
                   normalize=normalize, lambda_=lambda_)


def della_linear(base, deltas, weights, *, density, epsilon, rescale=True, normalize=False, lambda_=1.0,
                 seed=0):
    """DELLA without sign election: MAGPRUNE each τ_t, then task arithmetic. Args/Returns: as :func:`della`."""
    return combine(_della(deltas, density, epsilon, seed, rescale), weights, consensus=False,
                   normalize=normalize, lambda_=lambda_)


# --- SCE, nearswap ----------------------------------------------------------------------------------


def sce(base, deltas, weights, *, select_topk=1.0):
    """SCE (FuseChat): select by variance, calculate coefficients, erase sign conflicts (mergekit's ``sce``).

    Select (``select_topk`` < 1): keep, in every τ_t, the k = int(select_topk·#{var > 0}) positions of
    largest variance across the T task vectors (population variance; equal variances by lower index).
    Calculate: c_t = mean(τ_t²) / Σ_s mean(τ_s²) (1/T each if that sum is < 1e-6). Erase: an entry
    of τ_t takes part where its sign equals the sign of Σ_s τ_s (0 counts as +; zeros never do).
    Δ = Σ_t c_t τ_t [agree] / max(Σ_t c_t [agree], 1e-6).

    Args:
        base: θ0, shape S (unused). deltas: T τ of shape S (modified). weights: ignored (mergekit's has none).
    Returns:
        Δ, shape S.
    """
    T = len(deltas)
    if select_topk < 1:
        mean = deltas[0].clone()
        for d in deltas[1:]:
            mean.add_(d)
        mean.div_(T)
        var = torch.zeros_like(mean)
        for d in deltas:
            var.add_((d - mean).square_())
        var.div_(T)
        del mean
        k = int(int(torch.count_nonzero(var)) * select_topk)
        if k == 0:
            return torch.zeros_like(deltas[0])
        mask = topk_mask(var, k)
        del var
        for d in deltas:
            d.mul_(mask)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    positive = total >= 0
    del total
    ms = [float(d.square().sum(dtype=F64)) / max(1, d.numel()) for d in deltas]
    ms_sum = sum(ms)
    coef = [1.0 / T] * T if abs(ms_sum) < 1e-6 else [m / ms_sum for m in ms]
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for d, c in zip(deltas, coef):
        agree = torch.where(positive, d > 0, d < 0)
        num.add_(d * agree, alpha=c)
        den.add_(agree.to(den.dtype), alpha=c)
    return num.div_(den.clamp_(min=1e-6))


def nearswap(base, deltas, weights, *, t=1e-4):
    """NearSwap: take the other model's value where it is near the base's (mergekit's formula).

    With τ = θ1 − θ0 of the other model: w = clamp(t / max(|τ|, 1e-6), 0, 1) per entry and the result
    w·θ1 + (1−w)·θ0, i.e. Δ = w·τ: entries with |τ| ≤ t are swapped in whole, farther ones by t/|τ|.

    Args:
        base: θ0, shape S. deltas: one τ (or two, one of them all zero: the base listed as a model).
        weights: ignored (mergekit's nearswap has none). t: the distance scale.
    Returns:
        Δ, shape S.
    """
    tau = _the_other("nearswap", deltas)
    return tau * (t / tau.abs().clamp(min=1e-6)).clamp_(0, 1)


# --- registry -----------------------------------------------------------------------------------------


def _positive(v) -> str | None:
    return None if _number(v) is None and v > 0 else "must be a positive number"


def _count(v) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be an integer ≥ 0"


NO_WEIGHT = Param("weight", 1.0, _number, per_model=True, doc="accepted, no effect (mergekit's method has none)")
EPSILON = Param("epsilon", 0.15, _in_half_open, per_model=True,
                doc="half-width ε of the keep probabilities density ± ε (both in (0, 1))")
DELLA_DENSITY = Param("density", 1.0, _in_unit, per_model=True, doc="mean keep probability, in (0, 1]")


def _t(default, doc) -> Param:
    return Param("t", default, _number, doc=doc, required=True)


for _m in [
    Method("slerp", slerp, (NO_WEIGHT, _t(0.5, "interpolation factor: 0 gives the base, 1 the other model")),
           "spherical interpolation between the base and one other model", stream="reduce",
           reduce=(slerp_stats, slerp_finish, slerp_apply)),
    Method("nuslerp", nuslerp, (
        Param("weight", 1.0, _number, per_model=True, doc="relative weight; t = w_1 / (w_0 + w_1)"),
        Param("nuslerp_flatten", True, _boolean, doc="slerp each tensor as one vector (else row by row)"),
        Param("nuslerp_row_wise", False, _boolean, doc="without flatten: vectors along dim 0 instead of the last")),
           "slerp of two task vectors around the base, t from the weights"),
    Method("multislerp", multislerp, (
        WEIGHT, Param("normalize_weights", True, _boolean, doc="divide the weights by their sum"),
        Param("eps", 1e-8, _positive, doc="numerical floor of norms")),
           "barycentric spherical interpolation of the task vectors"),
    Method("karcher", karcher, (
        Param("weight", 1.0, _number, per_model=True, doc="weight of the model in the mean (mergekit: equal)"),
        Param("max_iter", 10, _count, doc="maximum iterations"),
        Param("tol", 1e-5, _positive, doc="convergence tolerance"),
        Param("include_base", True, _boolean, doc="the base is a point of the mean, weight 1 (mergekit 0.1.5)")),
           "Karcher (Riemannian) mean of the models' weights", drops=True),
    Method("model_stock", model_stock, (
        NO_WEIGHT, Param("filter_wise", False, _boolean, doc="one interpolation factor per row")),
           "interpolate base → mean of the models by t from their mean pairwise cosine", stream="reduce",
           reduce=(model_stock_stats, model_stock_finish, model_stock_apply),
           stream_if=lambda params: not params.get("filter_wise")),
    Method("della", della, (WEIGHT, DELLA_DENSITY, EPSILON, _rescale_param(True), _normalize(True), LAMBDA,
                            INT8_MASK, SEED),
           "magnitude-ranked random drop (density ± epsilon per row), rescale, TIES sign election",
           random=True, drops=True),
    Method("della_linear", della_linear, (WEIGHT, DELLA_DENSITY, EPSILON, _rescale_param(True), _normalize(False),
                                          LAMBDA, INT8_MASK, SEED),
           "magnitude-ranked random drop (density ± epsilon per row), rescale, task arithmetic",
           random=True, drops=True),
    Method("sce", sce, (NO_WEIGHT, Param("select_topk", 1.0, _in_unit,
                                         doc="fraction of positions kept, by variance across models"), INT8_MASK),
           "select by variance, coefficients from squared magnitudes, erase sign conflicts", drops=True),
    Method("nearswap", nearswap, (NO_WEIGHT, _t(1e-4, "distance scale: entries with |θ1 − θ0| ≤ t are swapped")),
           "take the other model's values where they are near the base's"),
]:
    register(_m)
