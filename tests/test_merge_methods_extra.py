"""slerp, nuslerp, multislerp, karcher, model_stock, della, della_linear, sce, nearswap: hand-checkable
cases, slow loop references written from mergekit's definitions, and merges of tiny Llama checkpoints."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from taskvec.merge import METHODS, MergeError, get_method, load_config, merge, merge_vectors, to_mergekit
from taskvec.merge.methods import random_prune
from taskvec.merge.methods_extra import della_keep_probs, della_prune

NEW = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock", "della", "della_linear", "sce", "nearswap")
F64 = torch.float64


def _rand(T=3, shape=(4, 5), seed=0, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [scale * torch.randn(shape, generator=g, dtype=dtype) for _ in range(T)]


def _call(name, base, deltas, weights=None, **params):
    weights = [1.0] * len(deltas) if weights is None else weights
    return get_method(name)(base, [d.clone() for d in deltas], weights, **params)


def _close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=tol, atol=tol)


def _list(x):
    return x.reshape(-1).tolist()


def _norm(v):
    return math.sqrt(sum(e * e for e in v))


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# --- slerp ------------------------------------------------------------------------------------------


def ref_slerp(t, a, b):
    """mergekit's slerp, one entry at a time on flat lists."""
    na, nb = _norm(a), _norm(b)
    ua = [x / na for x in a] if na > 1e-8 else a
    ub = [x / nb for x in b] if nb > 1e-8 else b
    dot = _dot(ua, ub)
    if abs(dot) > 0.9995:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    th = math.acos(dot)
    s0, s1 = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return [s0 * x + s1 * y for x, y in zip(a, b)]


def test_slerp_endpoints_bisector_and_reference():
    base, (tau,) = _rand(T=1)
    other = base + tau
    _close(base + _call("slerp", base, [tau], t=0.0), base)
    _close(base + _call("slerp", base, [tau], t=1.0), other)
    for t in (0.25, 0.7, 1.3, -0.2):
        got = base + _call("slerp", base, [tau], t=t)
        _close(got.reshape(-1), ref_slerp(t, _list(base), _list(other)))
        # the base listed as a model (its τ is all zero) is recognised, in either order
        _close(base + _call("slerp", base, [torch.zeros_like(tau), tau], t=t), got)
        _close(base + _call("slerp", base, [tau, torch.zeros_like(tau)], t=t), got)
    e1, e2 = torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    _close(e1 + _call("slerp", e1, [e2 - e1], t=0.5), [2 ** -0.5, 2 ** -0.5, 0.0])
    _close(e1 + _call("slerp", e1, [e2 - e1], t=1 / 3), [math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0])
    # norms are interpolated along the arc too: |result| stays between the endpoint norms for unit inputs
    assert abs(float((e1 + _call("slerp", e1, [e2 - e1], t=0.3)).norm()) - 1) < 1e-12


def test_slerp_colinear_falls_back_to_lerp_and_zero_base():
    base = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    for other in (2.5 * base, -3.0 * base, 2.0 * base + 1e-6):  # |cos| = 1, 1, 1 − O(1e-13): all > 0.9995
        for t in (0.3, 0.8):
            _close(_call("slerp", base, [other - base], t=t), t * (other - base))
    # a zero tensor is not normalised: cos = 0, Ω = π/2 and the result is sin(tπ/2)·θ1
    zero, other = torch.zeros(4, dtype=F64), torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=F64)
    _close(_call("slerp", zero, [other], t=0.4), math.sin(0.4 * math.pi / 2) * other)


def test_slerp_and_nearswap_need_exactly_one_other_model():
    base, deltas = _rand(T=3)
    for name in ("slerp", "nearswap"):
        with pytest.raises(MergeError, match=f"{name} merges the base with exactly one other model.*2 of which"):
            _call(name, base, deltas[:2])
        with pytest.raises(MergeError, match="got 3 models"):
            _call(name, base, deltas)
        z = torch.zeros_like(base)
        assert torch.equal(_call(name, base, [z, z]), z)  # both at the base: nothing moves


# --- nuslerp ------------------------------------------------------------------------------------------


def ref_nuslerp_vec(t, a, b):
    n0, n1 = max(_norm(a), 1e-7), max(_norm(b), 1e-7)
    cos = min(1.0, max(-1.0, _dot(a, b) / (n0 * n1)))
    th = math.acos(cos)
    if abs(math.sin(th)) < 1e-8:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    return [(math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th) for x, y in zip(a, b)]


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_reference(flatten, row_wise):
    base, (x0, x1) = _rand(T=2, shape=(3, 4), seed=1)
    w = [1.0, 3.0]  # t = 0.75
    got = _call("nuslerp", base, [x0, x1], w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    if flatten:
        _close(got.reshape(-1), ref_nuslerp_vec(0.75, _list(x0), _list(x1)))
    elif not row_wise:  # each row (vector along the last dim) on its own
        for i in range(3):
            _close(got[i], ref_nuslerp_vec(0.75, x0[i].tolist(), x1[i].tolist()))
    else:  # mergekit's row_wise: vectors along dim 0 (the columns of a matrix)
        for j in range(4):
            _close(got[:, j], ref_nuslerp_vec(0.75, x0[:, j].tolist(), x1[:, j].tolist()))
    # a 1-D tensor is one vector in every mode
    v = _call("nuslerp", base[0], [x0[0], x1[0]], w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    _close(v, ref_nuslerp_vec(0.75, x0[0].tolist(), x1[0].tolist()))


def test_nuslerp_weights_colinear_rows_and_errors():
    base, (x0, x1) = _rand(T=2, shape=(3, 4), seed=2)
    _close(_call("nuslerp", base, [x0, x1], [2.0, 0.0]), x0)  # t = 0
    _close(_call("nuslerp", base, [x0, x1], [0.0, 5.0]), x1)  # t = 1
    # weights summing to ~0: t = 0.5
    _close(_call("nuslerp", base, [x0, x1], [1.0, -1.0]), _call("nuslerp", base, [x0, x1], [1.0, 1.0]))
    # colinear rows interpolate linearly (sin Ω = 0, or so small that the slerp formula is the lerp)
    y = torch.stack([2.0 * x0[0], 3.0 * x0[1], x1[2]])
    got = _call("nuslerp", base, [x0, y], [1.0, 1.0], nuslerp_flatten=False)
    _close(got[0], 1.5 * x0[0], tol=1e-6)
    _close(got[1], 2.0 * x0[1], tol=1e-6)
    _close(got[2], ref_nuslerp_vec(0.5, x0[2].tolist(), x1[2].tolist()))
    _close(_call("nuslerp", base, [x0], [1.0]), x0)
    with pytest.raises(MergeError, match="exactly two models"):
        _call("nuslerp", base, [x0, x1, x0])


# --- multislerp ----------------------------------------------------------------------------------------


def ref_multislerp(vecs, w, normalize=True, eps=1e-8):
    """mergekit's multislerp step by step (tangent space at the weighted mean, exponential map back)."""
    if normalize:
        w = [x / sum(w) for x in w]
    norms = [_norm(v) for v in vecs]
    units = [[x / (n + eps) for x in v] for v, n in zip(vecs, norms)]
    mean = [sum(wi * u[j] for wi, u in zip(w, units)) for j in range(len(vecs[0]))]
    mn = _norm(mean)
    mean = [x / mn for x in mean]
    dots = [_dot(u, mean) for u in units]
    tangents = [[x - d * m for x, m in zip(u, mean)] for u, d in zip(units, dots)]
    tr = [sum(wi * tg[j] for wi, tg in zip(w, tangents)) for j in range(len(mean))]
    tn = _norm(tr) + eps
    res = [m * math.cos(tn) + x * math.sin(tn) / tn for m, x in zip(mean, tr)]
    avg = sum(wi * n for wi, n in zip(w, norms))
    return [avg * x for x in res]


def test_multislerp_matches_reference_and_simple_cases():
    base, deltas = _rand(T=3, shape=(3, 5), seed=3)
    w = [0.5, 1.0, 2.0]
    for normalize in (True, False):
        got = _call("multislerp", base, deltas, w, normalize_weights=normalize)
        _close(got.reshape(-1), ref_multislerp([_list(d) for d in deltas], w, normalize))
    # equal models → that model; one model → itself
    _close(_call("multislerp", base, [deltas[0]] * 3, w), deltas[0])
    _close(_call("multislerp", base, deltas[:1], [0.3]), deltas[0])
    # two orthogonal task vectors of norm 2, equal weights: norm-2 bisector
    e1, e2 = torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64)
    _close(_call("multislerp", torch.zeros(2, dtype=F64), [e1, e2]), [2 ** 0.5, 2 ** 0.5])
    # without normalisation the weights scale the norm
    _close(_call("multislerp", base, deltas, [2.0] * 3, normalize_weights=False),
           3 * 2.0 * _call("multislerp", base, deltas, [1.0] * 3))


def test_multislerp_degenerate_inputs():
    base, (a, b) = _rand(T=2, seed=4)
    z = torch.zeros_like(a)
    assert torch.equal(_call("multislerp", base, [z, z, z]), z)
    _close(_call("multislerp", base, [a, -a]), z)  # two antipodal: mergekit's lerp fallback
    with pytest.raises(MergeError, match="weighted mean of the unit task vectors is zero"):
        _call("multislerp", base, [a, -a, b], [1.0, 1.0, 0.0])
    with pytest.raises(MergeError, match="sum to 0"):
        _call("multislerp", base, [a, b], [1.0, -1.0])


# --- karcher -----------------------------------------------------------------------------------------


def ref_karcher(points, alphas, max_iter, tol):
    """mergekit's karcher_merge_tensors on flat lists (alphas as given, not renormalised)."""
    norms = [_norm(p) for p in points]
    units = [[x / n for x in p] if n > 0 else [0.0] * len(p) for p, n in zip(points, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = [alphas[i] / sum(alphas[i] for i in valid) for i in valid]
    us = [units[i] for i in valid]
    u = [sum(ai * ui[j] for ai, ui in zip(a, us)) for j in range(len(points[0]))]
    nu = _norm(u)
    u = list(us[0]) if nu < tol else [x / nu for x in u]
    for _ in range(max_iter):
        T = [0.0] * len(u)
        for ai, ui in zip(a, us):
            d = min(1.0, max(-1.0, _dot(u, ui)))
            th = math.acos(d)
            if th < tol:
                continue
            T = [x + ai * (th / math.sin(th)) * (y - d * z) for x, y, z in zip(T, ui, u)]
        nT = _norm(T)
        if nT < tol:
            break
        u = [math.cos(nT) * x + math.sin(nT) * y / nT for x, y in zip(u, T)]
        nu = _norm(u)
        if nu > tol:
            u = [x / nu for x in u]
    s = sum(al * n for al, n in zip(alphas, norms))
    return [s * x for x in u]


def test_karcher_matches_reference_and_is_a_karcher_mean():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, generator=g, dtype=F64)
    points = [torch.rand(6, generator=g, dtype=F64) + 0.5 for _ in range(3)]  # one open orthant: a small cap
    deltas = [p - base for p in points]
    w = [1.0, 2.0, 0.5]
    for it in (1, 3):
        got = base + _call("karcher", base, deltas, w, max_iter=it, tol=1e-5, include_base=False)
        _close(got, ref_karcher([p.tolist() for p in points], [x / sum(w) for x in w], it, 1e-5))
    # converged: the weighted sum of log maps at the result vanishes, and the norm is the weighted mean norm
    got = base + _call("karcher", base, deltas, w, max_iter=200, tol=1e-13, include_base=False)
    u = got / got.norm()
    log_sum = torch.zeros(6, dtype=F64)
    for p, wi in zip(points, w):
        q = p / p.norm()
        c = float(q @ u)
        log_sum += wi * math.acos(c) / math.sqrt(1 - c * c) * (q - c * u)
    assert float(log_sum.norm()) < 1e-9
    _close(got.norm(), sum(wi * p.norm() for wi, p in zip(w, points)) / sum(w))


def test_karcher_simple_cases():
    base, deltas = _rand(T=2, seed=6)
    kw = {"include_base": False}
    _close(_call("karcher", base, deltas[:1], **kw), deltas[0])  # one model: itself
    _close(_call("karcher", base, [deltas[0]] * 3, **kw), deltas[0], tol=1e-6)  # equal models: that model
    _close(_call("karcher", base, deltas, [3.0, 0.0], **kw), deltas[0], tol=1e-6)  # weight 0: ignored
    # with the base (the default, as mergekit 0.1.5): the mean of θ0 (weight 1) and the models
    _close(_call("karcher", base, [d.clone() for d in deltas], [2.0, 1.0]),
           _call("karcher", base, [torch.zeros_like(base), *[d.clone() for d in deltas]], [1.0, 2.0, 1.0], **kw))
    # two points: the geodesic midpoint, scaled to the mean norm
    phi = 1.1
    p0, p1 = torch.tensor([2.0, 0.0], dtype=F64), 4 * torch.tensor([math.cos(phi), math.sin(phi)], dtype=F64)
    b = torch.tensor([0.3, -0.2], dtype=F64)
    _close(b + _call("karcher", b, [p0 - b, p1 - b], include_base=False), [3 * math.cos(phi / 2), 3 * math.sin(phi / 2)])
    with pytest.raises(MergeError, match="weights must be ≥ 0"):
        _call("karcher", base, deltas, [1.0, -1.0])


# --- model stock ---------------------------------------------------------------------------------------


def ref_model_stock(rows_per_model):
    """t and merged delta per row from flat row lists: rows_per_model[t][r] = list of entries."""
    N, R = len(rows_per_model), len(rows_per_model[0])
    out = []
    for r in range(R):
        rows = [m[r] for m in rows_per_model]
        cos = [min(1.0, max(-1.0, _dot(rows[i], rows[j]) / max(_norm(rows[i]) * _norm(rows[j]), 1e-6)))
               for i in range(N) for j in range(i + 1, N)]
        c = sum(cos) / len(cos)
        t = N * c / (1 + (N - 1) * c)
        out.append([t * sum(m[k] for m in rows) / N for k in range(len(rows[0]))])
    return out


def test_model_stock_matches_reference():
    base, deltas = _rand(T=3, shape=(4, 5), seed=7)
    got = _call("model_stock", base, deltas)
    _close(got.reshape(-1), ref_model_stock([[_list(d)] for d in deltas])[0])
    got = _call("model_stock", base, deltas, filter_wise=True)
    _close(got, ref_model_stock([d.tolist() for d in deltas]))
    v = _call("model_stock", base[0], [d[0] for d in deltas], filter_wise=True)  # 1-D: one row
    _close(v, ref_model_stock([[d[0].tolist()] for d in deltas])[0])


def test_model_stock_hand_cases():
    base, (a,) = _rand(T=1, seed=8)
    _close(_call("model_stock", base, [a, a, a]), a)  # identical offsets: cos = 1, t = 1
    e1, e2, e3 = torch.eye(3, dtype=F64)
    _close(_call("model_stock", e1, [e1, e2, e3]), torch.zeros(3, dtype=F64))  # orthogonal: t = 0
    phi = 0.9
    x, y = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([math.cos(phi), math.sin(phi)], dtype=F64)
    t = 2 * math.cos(phi) / (1 + math.cos(phi))
    _close(_call("model_stock", torch.zeros(2, dtype=F64), [x, 3 * y]), t * (x + 3 * y) / 2)
    _close(_call("model_stock", base, [a]), a)


# --- DELLA -------------------------------------------------------------------------------------------


def ref_keep_probs_row(row, density, eps):
    n = len(row)
    order = sorted(range(n), key=lambda j: (abs(row[j]), j))
    rank = {j: r for r, j in enumerate(order)}
    return [(density - eps) + 2 * eps * rank[j] / (n - 1) for j in range(n)]


def test_della_keep_probs_per_row():
    x = torch.tensor([[0.3, -2.0, 1.0, 0.05, -0.7], [1.0, 2.0, -3.0, 4.0, 0.0]], dtype=F64)
    p = della_keep_probs(x, 0.5, 0.2)
    for i in range(2):
        _close(p[i], ref_keep_probs_row(x[i].tolist(), 0.5, 0.2))
    _close(p[1], [0.4, 0.5, 0.6, 0.7, 0.3])  # by hand: ranks 1, 2, 3, 4, 0 of 4 → 0.3 + 0.1·rank
    _close(della_keep_probs(x[0], 0.5, 0.2), p[0])  # 1-D: one row
    x3 = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    p3 = della_keep_probs(x3, 0.4, 0.1)  # >2-D: ranked along dim 1, as mergekit
    for i in range(2):
        for k in range(3):
            _close(p3[i, :, k], ref_keep_probs_row(x3[i, :, k].tolist(), 0.4, 0.1))
    _close(della_keep_probs(torch.tensor([[2.0], [-1.0]], dtype=F64), 0.6, 0.1), [[0.6], [0.6]])


def test_della_prune_keep_rates_and_unbiasedness():
    x = torch.tensor([0.1, -0.5, 0.9, 2.0, -0.05, 0.3, 1.2], dtype=F64)
    p = della_keep_probs(x, 0.5, 0.3)  # 0.2 … 0.8
    n = 3000
    kept = torch.zeros(7, dtype=F64)
    mean = torch.zeros(7, dtype=F64)
    for s in range(n):
        y = della_prune(x, 0.5, 0.3, torch.Generator().manual_seed(s), "density")
        kept += (y != 0).to(F64)
        mean += y / n
    assert ((kept / n - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all()
    assert ((mean - x).abs() <= 5 * x.abs() * ((1 - p) / (p * n)).sqrt()).all()  # ×1/p: E[y] = x
    # mergekit's rescale keeps the L1 norm; density 1 returns the tensor itself
    y = della_prune(x, 0.5, 0.3, torch.Generator().manual_seed(1), True)
    _close(y.abs().sum(), x.abs().sum())
    assert della_prune(x, 1.0, 0.3, torch.Generator(), True) is x
    for d, e in ((0.9, 0.15), (0.1, 0.15)):
        with pytest.raises(MergeError, match="density ± epsilon must lie in"):
            della_prune(x, d, e, torch.Generator(), True)


def ref_combine(deltas, weights, consensus, normalize, lam):
    out = []
    for j in range(len(deltas[0])):
        vals = [w * d[j] for d, w in zip(deltas, weights)]
        if consensus:
            s = 1 if sum(vals) >= 0 else -1
            agree = [v * s > 0 for v in vals]
            num = sum(v for v, a in zip(vals, agree) if a)
            den = sum(w for w, a in zip(weights, agree) if a) or 1.0
        else:
            num, den = sum(vals), sum(weights)
        out.append(lam * (num / den if normalize else num))
    return out


@pytest.mark.parametrize("name,rescale", [("della", True), ("della_linear", "density"), ("della_linear", False)])
def test_della_matches_seeded_reference(name, rescale):
    base, deltas = _rand(T=3, shape=(3, 6), seed=9)
    w, dens, eps, seed = [0.5, 1.0, 1.5], [0.4, 0.6, 0.5], [0.2, 0.1, 0.0], 17
    normalize = name == "della"
    got = _call(name, base, deltas, w, density=dens, epsilon=eps, seed=seed, rescale=rescale,
                normalize=normalize, **{"lambda": 0.8})
    pruned = []
    for t, (d, p, e) in enumerate(zip(deltas, dens, eps)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + t)
        u = torch.rand(d.shape, generator=g, dtype=F64).tolist()
        out = []
        for i in range(d.shape[0]):
            probs = ref_keep_probs_row(d[i].tolist(), p, e)
            for j in range(d.shape[1]):
                keep = u[i][j] < probs[j]
                v = float(d[i, j]) if keep else 0.0
                out.append(v / probs[j] if rescale == "density" else v)
        if rescale is True:
            out = [v * sum(abs(x) for x in _list(d)) / sum(abs(x) for x in out) for v in out]
        pruned.append(out)
    _close(got.reshape(-1), ref_combine(pruned, w, name == "della", normalize, 0.8))


def test_della_reduces_to_ties_dare_and_task_arithmetic():
    base, deltas = _rand(T=3, shape=(5, 6), seed=10)
    w = [0.7, 1.0, 1.3]
    lam = {"lambda": 0.9}
    # density 1: no pruning at all
    _close(_call("della", base, deltas, w, density=[1.0] * 3, epsilon=[0.2] * 3, seed=1, **lam),
           _call("ties", base, deltas, w, density=[1.0] * 3, **lam))
    _close(_call("della_linear", base, deltas, w, density=[1.0] * 3, epsilon=[0.2] * 3, seed=1, **lam),
           _call("task_arithmetic", base, deltas, w, **lam))
    # epsilon 0: every keep probability is the density, and the draws are DARE's: the same merge
    for rescale in (True, "density", False):
        for della, dare in (("della", "dare_ties"), ("della_linear", "dare_linear")):
            kw = dict(density=[0.4, 0.6, 0.5], seed=123, rescale=rescale, normalize=della == "della", **lam)
            _close(_call(della, base, deltas, w, epsilon=[0.0] * 3, **kw), _call(dare, base, deltas, w, **kw))
    x = deltas[0]
    _close(della_prune(x, 0.3, 0.0, torch.Generator().manual_seed(4), "density"),
           random_prune(x, 0.3, torch.Generator().manual_seed(4), "density"))
    a = _call("della", base, deltas, w, density=[0.5] * 3, epsilon=[0.1] * 3, seed=5)
    assert torch.equal(a, _call("della", base, deltas, w, density=[0.5] * 3, epsilon=[0.1] * 3, seed=5))
    assert not torch.equal(a, _call("della", base, deltas, w, density=[0.5] * 3, epsilon=[0.1] * 3, seed=6))


# --- SCE -------------------------------------------------------------------------------------------------


def ref_sce(deltas, select_topk):
    T, n = len(deltas), len(deltas[0])
    tv = [list(d) for d in deltas]
    if select_topk < 1:
        var = []
        for j in range(n):
            m = sum(d[j] for d in tv) / T
            var.append(sum((d[j] - m) ** 2 for d in tv) / T)
        k = int(sum(1 for v in var if v != 0) * select_topk)
        keep = set(sorted(range(n), key=lambda j: (-var[j], j))[:k])
        tv = [[x if j in keep else 0.0 for j, x in enumerate(d)] for d in tv]
    ms = [sum(x * x for x in d) / n for d in tv]
    c = [1 / T] * T if abs(sum(ms)) < 1e-6 else [m / sum(ms) for m in ms]
    out = []
    for j in range(n):
        s = 1 if sum(d[j] for d in tv) >= 0 else -1
        agree = [d[j] * s > 0 for d in tv]
        num = sum(ci * d[j] for ci, d, a in zip(c, tv, agree) if a)
        den = sum(ci for ci, a in zip(c, agree) if a)
        out.append(num / max(den, 1e-6))
    return out


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("scale", [1.0, 1e-4])  # 1e-4: Σ mean(τ²) < 1e-6, equal coefficients (mergekit's rule)
def test_sce_matches_reference(select_topk, scale):
    base, deltas = _rand(T=3, shape=(4, 6), seed=11, scale=scale)
    got = _call("sce", base, deltas, select_topk=select_topk)
    _close(got.reshape(-1), ref_sce([_list(d) for d in deltas], select_topk), tol=1e-9 * scale)


def test_sce_by_hand():
    a, b = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([3.0, 1.0], dtype=F64)
    # signs of the sum: +, −; coefficients mean(τ²) = 2.5, 5 → 1/3, 2/3
    _close(_call("sce", torch.zeros(2, dtype=F64), [a, b]), [7 / 3, -2.0])
    assert torch.equal(_call("sce", a, [b], select_topk=0.5), torch.zeros(2, dtype=F64))  # variance 0


# --- nearswap --------------------------------------------------------------------------------------------


def test_nearswap_matches_literal_loop():
    g = torch.Generator().manual_seed(12)
    a = torch.randn(40, generator=g, dtype=F64)
    b = a + 0.02 * torch.randn(40, generator=g, dtype=F64)
    t = 0.01
    got = a + _call("nearswap", a, [b - a], t=t)
    ref = []
    for x, y in zip(a.tolist(), b.tolist()):
        w = min(1.0, max(0.0, t / max(abs(x - y), 1e-6)))
        ref.append(w * y + (1 - w) * x)
    _close(got, ref, tol=1e-12)
    diff = (b - a).abs()
    assert ((diff < t) == torch.isclose(got, b, rtol=0, atol=1e-15)).all()  # near entries swapped in whole
    assert 0 < int((diff < t).sum()) < 40  # (some are, some are not)
    _close(a + _call("nearswap", a, [torch.zeros_like(a), b - a], t=t), got)  # base listed as a model
    _close(a + _call("nearswap", a, [b - a], t=10.0), b)
    _close(a + _call("nearswap", a, [b - a], t=0.0), a)


# --- registry, config ----------------------------------------------------------------------------------


def test_registry_configs_and_mergekit_export():
    assert set(NEW) <= set(METHODS) and all(METHODS[n].mergekit for n in NEW)
    assert get_method("della").random and get_method("della_linear").random and not get_method("slerp").random
    cfg = {"merge_method": "slerp", "base_model": "b", "models": [{"model": "m"}],
           "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.5}]}}
    assert load_config(cfg).method == "slerp"
    mk = to_mergekit(load_config(cfg))
    assert mk["merge_method"] == "slerp" and mk["parameters"]["t"] == cfg["parameters"]["t"]
    with pytest.raises(MergeError, match="unknown parameter 'density' for method 'slerp'"):
        load_config(cfg | {"parameters": {"density": 0.5}})
    della = {"method": "della", "base_model": "b", "models": [{"model": "m", "parameters": {"epsilon": 1.2}}]}
    with pytest.raises(MergeError, match=r"epsilon.*must be in \[0, 1\)"):
        load_config(della)
    for method, params in (("nuslerp", {"nuslerp_flatten": 1}), ("karcher", {"max_iter": 2.5}),
                           ("karcher", {"tol": 0}), ("sce", {"select_topk": 0}), ("model_stock", {"filter_wise": "y"}),
                           ("multislerp", {"eps": -1.0}), ("nearswap", {"t": "x"})):
        with pytest.raises(MergeError, match=f"parameters.{next(iter(params))}"):
            load_config({"method": method, "base_model": "b", "models": ["m"], "parameters": params})


def test_merge_vectors_with_new_methods():
    base, deltas = _rand(T=2, shape=(3, 4), seed=13, dtype=torch.float32)
    vecs = [SimpleNamespace(deltas={"w": d}) for d in deltas]
    out = merge_vectors(vecs, "della", {"w": base}, density=[0.5, 0.6], epsilon=0.1, seed=2)
    assert out["w"].shape == (3, 4)
    out = merge_vectors(vecs, "nuslerp", {"w": base}, weight=[1.0, 3.0])
    torch.testing.assert_close(out["w"], _call("nuslerp", base, deltas, [1.0, 3.0]))


# --- through the engine, on tiny Llama checkpoints ----------------------------------------------------------


LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64, "tie_word_embeddings": False}


def _llama(path, seed=0, base_state=None, scale=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    if base_state is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base_state[n] + scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(path, max_shard_size="40KB")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas_extra")
    base = _llama(root / "base")
    fts = [_llama(root / f"ft{i}", seed=i + 1, base_state=base) for i in range(3)]
    return root, base, fts


def _state(out):
    with open(out / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    d = {}
    for f in files:
        d.update(load_file(str(out / f)))
    return d


E2E = [  # method, inputs ("base" or ft index), per-model parameters, global parameters
    ("slerp", [0], None, {"t": [0.0, 1.0]}),
    ("slerp", ["base", 1], None, {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}),
    ("nuslerp", [0, 1], [{"weight": 1.0}, {"weight": 2.0}], {"nuslerp_flatten": False}),
    ("multislerp", [0, 1, 2], [{"weight": 0.5}, {"weight": 1.0}, {"weight": 1.5}], {}),
    ("karcher", [0, 1, 2], None, {"max_iter": 20}),
    ("model_stock", [0, 1, 2], None, {"filter_wise": True}),
    ("della", [0, 1, 2], [{"density": 0.5, "epsilon": 0.1}] * 3, {"lambda": 0.9, "seed": 3}),
    ("della_linear", [0, 1, 2], [{"density": 0.4}] * 3, {"epsilon": 0.2, "rescale": "density"}),
    ("sce", [0, 1, 2], None, {"select_topk": 0.5}),
    ("nearswap", [2], None, {"t": 0.01}),
]


@pytest.mark.parametrize("method,inputs,mparams,params", E2E, ids=[f"{e[0]}-{i}" for i, e in enumerate(E2E)])
def test_merge_through_engine_equals_method_and_loads(llamas, tmp_path, method, inputs, mparams, params):
    from transformers import AutoModelForCausalLM

    from taskvec.merge.params import expand, layer_position

    root, base, fts = llamas
    paths = [root / ("base" if i == "base" else f"ft{i}") for i in inputs]
    mparams = mparams or [{}] * len(inputs)
    cfg = {"merge_method": method, "base_model": str(root / "base"),
           "models": [{"model": str(p), "parameters": mp} for p, mp in zip(paths, mparams)], "parameters": params}
    merge(cfg, tmp_path / "out", show_progress=False)
    got = _state(tmp_path / "out")
    assert set(got) == set(base)
    m, c = get_method(method), load_config(cfg)
    models = [base if i == "base" else fts[i] for i in inputs]
    for k, b in base.items():
        assert got[k].shape == b.shape and got[k].dtype == b.dtype, k
        w, per, glob = expand(m, k, layer_position(k, 2), [c.model_params(i) for i in range(len(inputs))],
                              c.global_params())
        torch.testing.assert_close(got[k], b + m(b, [f[k] - b for f in models], w, **per, **glob),
                                   rtol=1e-6, atol=1e-7, msg=k)
    if method == "slerp" and inputs == [0]:  # gradient t = [0, 1]: layer 0 and the non-layer tensors (t = 0,
        for k in base:                        # as mergekit 0.1.5) are the base, layer 1 the model
            if ".layers.1." not in k:
                assert torch.equal(got[k], base[k]), k
            else:
                torch.testing.assert_close(got[k], fts[0][k], rtol=1e-5, atol=1e-6, msg=k)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 33]])).logits).all()


def test_two_model_methods_refuse_two_non_base_models_through_engine(llamas, tmp_path):
    root, _, _ = llamas
    cfg = {"method": "slerp", "base_model": str(root / "base"),
           "models": [{"model": str(root / "ft0")}, {"model": str(root / "ft1")}], "parameters": {"t": 0.5}}
    with pytest.raises(MergeError, match="exactly one other model"):
        merge(cfg, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,inputs,params", [
    ("slerp", [1], {"t": 0.4}),
    ("slerp", ["base", 2], {"t": [0.2, 0.9]}),
    ("model_stock", [0, 1, 2], {}),
    ("model_stock", [0, 1], {"filter_wise": False}),
])
def test_reduce_streaming_splits_tensors_into_chunks_and_equals_the_whole_tensor_method(llamas, tmp_path,
                                                                                         monkeypatch, method,
                                                                                         inputs, params):
    """slerp and model_stock stream in two passes (sums, then Δ chunk by chunk): with chunks of 100 entries
    every tensor is split, and the result equals the method on whole tensors."""
    from taskvec.merge import methods
    from taskvec.merge.params import expand, layer_position

    assert get_method(method).streams(params)
    monkeypatch.setattr(methods, "CHUNK", 100)
    root, base, fts = llamas
    cfg = {"merge_method": method, "base_model": str(root / "base"), "parameters": params,
           "models": [{"model": str(root / ("base" if i == "base" else f"ft{i}"))} for i in inputs]}
    merge(cfg, tmp_path / "out", show_progress=False)
    got = _state(tmp_path / "out")
    m, c = get_method(method), load_config(cfg)
    models = [base if i == "base" else fts[i] for i in inputs]
    moved = 0
    for k, b in base.items():
        w, per, glob = expand(m, k, layer_position(k, 2), [c.model_params(i) for i in range(len(inputs))],
                              c.global_params())
        want = b + m(b, [f[k] - b for f in models], w, **per, **glob)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7, msg=k)
        moved += not torch.equal(want, b)
    assert moved > len(base) // 2  # the merge is not a copy of the base
    assert not get_method("model_stock").streams({"filter_wise": True})


def test_della_ranks_equal_the_double_argsort_definition_with_ties():
    """The ranks come from one sort and a scatter; the definition: the argsort of the stable argsort of |x|."""
    g = torch.Generator().manual_seed(0)
    for shape in [(7,), (3, 5), (64, 300), (2, 3, 4)]:
        x = torch.randn(shape, generator=g)
        x.view(-1)[: x.numel() // 3] = 0.0  # ties: equal magnitudes ranked by index
        rows = x.reshape(1, -1) if x.ndim < 2 else x
        n = rows.shape[1]
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).float()
        want = ((0.5 - 0.1) + ranks * (2 * 0.1 / (n - 1))).reshape(x.shape)
        assert torch.equal(della_keep_probs(x, 0.5, 0.1), want), shape
