"""Merge methods against slow, obvious references, peft's merge_utils, and DARE's distribution."""

import itertools

import pytest
import torch

from taskvec.merge import METHODS, MergeError, get_method, load_config
from taskvec.merge.methods import magnitude_prune, outlier_prune, random_prune, topk_mask


def _rand(T=3, shape=(6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = [torch.randn(shape, generator=g) for _ in range(T)]
    return base, deltas


def _call(name, base, deltas, weights, **params):
    return get_method(name)(base, [d.clone() for d in deltas], weights, **params)


# --- slow references: one entry at a time, straight from the definitions --------------------------


def ref_keep(x, k, drop_top=0):
    """Indices kept: rank by (|x| desc, flat index asc); drop the first drop_top, keep the next k."""
    flat = x.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))
    return set(order[drop_top:drop_top + k])


def ref_prune(x, keep):
    flat = x.reshape(-1).tolist()
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(flat)]).reshape(x.shape)


def ref_combine(deltas, weights, consensus, normalize, lam):
    flat = [d.reshape(-1).tolist() for d in deltas]
    out = []
    for j in range(len(flat[0])):
        vals = [w * f[j] for f, w in zip(flat, weights)]
        if consensus:
            s = 1 if sum(vals) >= 0 else -1
            agree = [(v > 0 and s > 0) or (v < 0 and s < 0) for v in vals]
            num = sum(v for v, a in zip(vals, agree) if a)
            den = sum(w for w, a in zip(weights, agree) if a) or 1.0
        else:
            num, den = sum(vals), sum(weights)
            den = den if abs(den) >= 1e-8 else 1.0
        out.append(lam * (num / den if normalize else num))
    return torch.tensor(out).reshape(deltas[0].shape)


def test_topk_mask_tie_rule_is_lowest_index_first():
    x = torch.tensor([1.0, -1.0, 1.0, 0.5, 1.0])
    assert topk_mask(x, 2).tolist() == [True, True, False, False, False]
    assert topk_mask(x, 4).tolist() == [True, True, True, False, True]
    g = torch.Generator().manual_seed(1)
    for n, vals in [(50, 3), (300_000, 7), (300_000, 10_000)]:  # many ties, small and large (sampled path)
        x = torch.randint(-vals, vals + 1, (n,), generator=g).float()
        for k in (1, n // 3, n // 2, n - 1):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.sort(x.abs(), descending=True, stable=True).indices[:k]] = True
            assert torch.equal(topk_mask(x, k), ref), (n, k)


def test_topk_mask_streamed_in_small_chunks_with_sampling(monkeypatch):
    from taskvec.merge import methods as mm

    monkeypatch.setattr(mm, "CHUNK", 37)
    monkeypatch.setattr(mm, "SAMPLE_MIN_N", 100)
    monkeypatch.setattr(mm, "SAMPLE_SIZE", 128)
    g = torch.Generator().manual_seed(2)
    for x in (torch.randint(-4, 5, (3000,), generator=g).float(), torch.randn(3000, generator=g)):
        for k in (1, 17, 1500, 2999):
            ref = torch.zeros(3000, dtype=torch.bool)
            ref[torch.sort(x.abs(), descending=True, stable=True).indices[:k]] = True
            assert torch.equal(topk_mask(x, k), ref), k


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_prune_matches_reference_and_peft(density):
    from peft.utils.merge_utils import magnitude_based_pruning

    _, (x, *_) = _rand(shape=(20, 30))
    k = int(density * x.numel())
    assert torch.equal(magnitude_prune(x, density), ref_prune(x, ref_keep(x, k)))
    assert torch.equal(magnitude_prune(x, density), magnitude_based_pruning(x, density))


def test_ties_matches_reference():
    base, deltas = _rand(T=4)
    weights, dens = [0.3, 1.0, 0.7, 1.5], [0.5, 0.3, 0.8, 1.0]
    got = _call("ties", base, deltas, weights, density=dens, normalize=True, **{"lambda": 0.8})
    pruned = [ref_prune(d, ref_keep(d, int(p * d.numel()))) for d, p in zip(deltas, dens)]
    ref = ref_combine(pruned, weights, True, True, 0.8)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("w", [1.0, 0.4])
def test_ties_equals_peft_with_equal_weights(w):
    """peft's disjoint mean divides by the number of agreeing tasks, mergekit (and taskvec) by their total
    weight: with equal weights w, peft's result is w × ours."""
    from peft.utils.merge_utils import ties as peft_ties

    base, deltas = _rand(T=3, shape=(40, 50), seed=3)
    got = _call("ties", base, deltas, [w] * 3, density=[0.4] * 3, **{"lambda": w})
    ref = peft_ties([d.clone() for d in deltas], torch.tensor([w] * 3), density=0.4)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_ties_differs_from_peft_with_unequal_weights():
    from peft.utils.merge_utils import ties as peft_ties

    base, deltas = _rand(T=3, shape=(40, 50), seed=4)
    weights = [0.2, 1.0, 3.0]
    got = _call("ties", base, deltas, weights, density=[0.4] * 3)
    ref = peft_ties([d.clone() for d in deltas], torch.tensor(weights), density=0.4)
    assert not torch.allclose(got, ref)


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.5)])
def test_task_arithmetic_and_linear(normalize, lam):
    base, deltas = _rand()
    w = [0.2, 0.5, 1.1]
    got = _call("task_arithmetic", base, deltas, w, normalize=normalize, **{"lambda": lam})
    torch.testing.assert_close(got, ref_combine(deltas, w, False, normalize, lam))
    soup = _call("linear", base, deltas, w, normalize=normalize)
    models = [base + d for d in deltas]
    expect = sum(wi * m for wi, m in zip(w, models)) / (sum(w) if normalize else 1.0)
    torch.testing.assert_close(base + soup, expect)


def test_breadcrumbs_matches_reference():
    base, deltas = _rand(T=2, shape=(10, 10))
    for density, gamma in [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0)]:
        n = 100
        keep, top = int(density * n), min(int(gamma * n), n - int(density * n))
        got = _call("breadcrumbs", base, deltas, [1.0, 0.5], density=[density] * 2, gamma=[gamma] * 2)
        pruned = [ref_prune(d, ref_keep(d, keep, drop_top=top)) for d in deltas]
        torch.testing.assert_close(got, ref_combine(pruned, [1.0, 0.5], False, False, 1.0))
        assert torch.count_nonzero(outlier_prune(deltas[0], density, gamma)) == keep


def ref_tsv(deltas):
    """The TSV-Merge reference algorithm (Gargiulo et al. 2025), written with explicit loops."""
    T = len(deltas)
    u0, s0, v0 = torch.linalg.svd(deltas[0], full_matrices=False)
    sum_u, sum_s, sum_v = torch.zeros_like(u0), torch.zeros_like(s0), torch.zeros_like(v0)
    k = int(s0.shape[0] / T)
    for i, d in enumerate(deltas):
        u, s, v = torch.linalg.svd(d, full_matrices=False)
        for j in range(k):
            sum_u[:, i * k + j], sum_s[i * k + j], sum_v[i * k + j, :] = u[:, j], s[j], v[j, :]
    uu, _, vu = torch.linalg.svd(sum_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sum_v, full_matrices=False)
    return uu @ vu @ torch.diag(sum_s) @ uv @ vv


def test_tsv_matches_reference_and_averages_vectors():
    base, deltas = _rand(T=3, shape=(12, 9), seed=5)
    got = _call("tsv", base, deltas, [1.0] * 3)
    torch.testing.assert_close(got, ref_tsv(deltas), rtol=1e-4, atol=1e-5)
    vec = [d[0] for d in deltas]
    torch.testing.assert_close(_call("tsv", base[0], vec, [1.0] * 3, **{"lambda": 2.0}), 2 * sum(vec) / 3)
    # orthogonalised factors: the rebuilt matrix keeps the concatenated singular values
    s = torch.linalg.svdvals(got)
    k = 9 // 3
    expect = torch.cat([torch.linalg.svdvals(d)[:k] for d in deltas]).sort(descending=True).values
    torch.testing.assert_close(s[: 3 * k], expect, rtol=1e-4, atol=1e-5)


def test_iso_c_matches_reference():
    base, deltas = _rand(T=3, shape=(8, 11), seed=6)
    got = _call("iso_c", base, deltas, [1.0, 0.5, 2.0], **{"lambda": 1.3})
    M = deltas[0] + 0.5 * deltas[1] + 2.0 * deltas[2]
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    torch.testing.assert_close(got, 1.3 * U @ torch.diag(torch.full_like(S, S.mean().item())) @ Vh)
    assert torch.allclose(torch.linalg.svdvals(got), torch.full((8,), 1.3 * S.mean().item()), atol=1e-5)
    vec = [d[0] for d in deltas]
    torch.testing.assert_close(_call("iso_c", base[0], vec, [1.0] * 3), sum(vec) / 3)


# --- DARE ----------------------------------------------------------------------------------------------


def test_dare_keep_rate_rescale_and_unbiasedness():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    p = 0.3
    g = torch.Generator().manual_seed(7)
    y = random_prune(x, p, g, rescale="density")
    kept = y != 0
    rate = kept.float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / p)
    # mergekit's rescale (l1): the L1 norm is kept exactly
    y1 = random_prune(x, p, torch.Generator().manual_seed(7), rescale=True)
    torch.testing.assert_close(y1.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)
    assert torch.equal(random_prune(x, p, torch.Generator().manual_seed(7), rescale=False) != 0, kept)
    # unbiased over seeds: the mean of many draws approaches x (standard error sqrt((1-p)/(p·n)))
    small = x[:500]
    n = 4000
    mean = sum(random_prune(small, p, torch.Generator().manual_seed(s), "density") for s in range(n)) / n
    se = (small.abs() * ((1 - p) / (p * n)) ** 0.5)
    assert ((mean - small).abs() <= 5 * se + 1e-6).all()


def test_dare_methods_are_deterministic_for_a_seed():
    base, deltas = _rand(T=3, shape=(30, 30))
    for name in ("dare_linear", "dare_ties"):
        a = _call(name, base, deltas, [1.0] * 3, density=[0.5] * 3, seed=11)
        b = _call(name, base, deltas, [1.0] * 3, density=[0.5] * 3, seed=11)
        c = _call(name, base, deltas, [1.0] * 3, density=[0.5] * 3, seed=12)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_linear_reference():
    base, deltas = _rand(T=2, shape=(5, 5))
    got = _call("dare_linear", base, deltas, [0.5, 2.0], density=[0.6, 0.6], seed=3, rescale="density")
    # rebuild the masks the method drew (same generator seeding) and combine by hand
    pruned = [random_prune(d, 0.6, torch.Generator().manual_seed(3 * 1_000_003 + t), "density")
              for t, d in enumerate(deltas)]
    torch.testing.assert_close(got, ref_combine(pruned, [0.5, 2.0], False, False, 1.0))


# --- registry and validation ---------------------------------------------------------------------------


def test_registry_and_validation_errors():
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "tsv",
            "iso_c"} <= set(METHODS)
    with pytest.raises(MergeError, match="unknown merge method 'tie'.*valid: linear, task_arithmetic, ties"):
        get_method("tie")
    cfg = {"method": "ties", "base_model": "b", "models": [{"model": "m"}]}
    with pytest.raises(MergeError, match="unknown parameter 'densty'.*valid: weight, density"):
        load_config(cfg | {"parameters": {"densty": 0.5}})
    for bad in (0, 0.0, 1.5, -0.2):
        with pytest.raises(MergeError, match=r"density.*must be in \(0, 1\]"):
            load_config(cfg | {"models": [{"model": "m", "parameters": {"density": bad}}]})
    with pytest.raises(MergeError, match=r"must be in \(0, 1\]"):
        load_config(cfg | {"parameters": {"density": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]}})
    with pytest.raises(MergeError, match="unknown parameter 'gamma' for method 'ties'"):
        load_config(cfg | {"parameters": {"gamma": 0.1}})
    with pytest.raises(MergeError, match="unknown parameter 'lambda'"):  # global-only name per model
        load_config(cfg | {"models": [{"model": "m", "parameters": {"lambda": 1.0}}]})
    with pytest.raises(MergeError, match="unknown config keys"):
        load_config(cfg | {"slerp_t": 1})


def test_every_method_handles_all_zero_and_single_task():
    from taskvec.merge.data_aware import is_data_aware

    for name, m in METHODS.items():
        if is_data_aware(name):  # not a tensor function: needs each task's data (tests/test_merge_data_aware.py)
            continue
        base, deltas = _rand(T=1, shape=(4, 6))
        params = {p.name: ([p.default] if p.per_model else p.default) for p in m.params if p.name != "weight"}
        for k in ("density",):
            if k in params:
                params[k] = [0.5]
        out = m(base, [torch.zeros_like(base)], [1.0], **params)
        assert out.shape == base.shape and torch.isfinite(out).all(), name
        out = m(base, [d.clone() for d in deltas], [1.0], **params)
        assert out.shape == base.shape, name


def test_filters_and_gradients_evaluate_like_mergekit():
    from taskvec.merge.config import evaluate

    rules = [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 1.0}]
    assert evaluate(rules, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.5
    assert evaluate(rules, "model.layers.3.mlp.up_proj.weight", 0.25) == 0.25
    assert evaluate(rules, "model.norm.weight", 1.0) == 1.0
    assert evaluate([0.0, 1.0, 0.0], "x", 0.5) == 1.0
    assert evaluate([0.0, 1.0, 0.0], "x", 0.25) == 0.5
    for a, b in itertools.combinations([0.1, 0.4, 0.9], 2):
        assert a <= evaluate([a, b], "x", 0.3) <= b
