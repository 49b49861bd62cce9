import torch
from transformers import BertConfig, BertModel

from taskvec.linearize import directional_outputs, jvp_batch, relative_linearisation_error
from taskvec.modeling import HeadSpec, LinearHead, TaskModel


def tiny(dtype=torch.float64):
    torch.manual_seed(0)
    bb = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=32, attn_implementation="eager"))
    m = TaskModel(bb, LinearHead(16, 3), HeadSpec("linear", "mean", 3)).to(dtype).eval()
    return m


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 0])}


def delta(m, scale=1.0, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {n[len("backbone."):]: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in m.named_parameters() if "attention.self" in n and n.endswith("weight")}


def shifted(m, d, eps):
    import copy
    m2 = copy.deepcopy(m)
    params = dict(m2.backbone.named_parameters())
    with torch.no_grad():
        for k, v in d.items():
            params[k].add_(eps * v)
    return m2


def f(m, b):
    with torch.no_grad():
        return m(b["input_ids"], b["attention_mask"]).double()


def test_layer_norm_second_order_workaround():
    """Forward-over-forward AD through native layer_norm is wrong in some torch versions; ours is not."""
    from torch.func import jvp

    from taskvec.linearize import _composite_layer_norm
    g = torch.Generator().manual_seed(0)
    x, t, w, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(5, 8), (5, 8), (8,), (8,)])
    fn = lambda x: _composite_layer_norm(x, (8,), w, b, 1e-12)
    ad = jvp(lambda x: jvp(fn, (x,), (t,))[1], (x,), (t,))[1]
    e = 1e-4
    fd = (fn(x + e * t) - 2 * fn(x) + fn(x - e * t)) / e ** 2
    assert torch.allclose(ad, fd, atol=1e-5)
    assert torch.allclose(fn(x), torch.nn.functional.layer_norm(x, (8,), w, b, 1e-12), atol=1e-12)


def test_jvp_and_second_order_match_finite_differences():
    m, b = tiny(), batch()
    d = delta(m)
    f0, jd, hdd = jvp_batch(m, b, d, second_order=True)
    eps = 1e-4
    fp, fm = f(shifted(m, d, eps), b), f(shifted(m, d, -eps), b)
    fd1 = (fp - fm) / (2 * eps)
    fd2 = (fp - 2 * f(m, b) + fm) / eps ** 2
    # outputs are cast to float32 by jvp_batch: compare at float32 resolution
    assert torch.allclose(jd.double(), fd1, rtol=1e-5, atol=1e-6)
    assert torch.allclose(hdd.double(), fd2, rtol=1e-3, atol=1e-4)


def test_second_order_prediction_beats_first_order_for_small_steps():
    m, b = tiny(), batch()
    d = delta(m, 0.05)
    dirs = directional_outputs(m, [b], {"d": d}, second_order=True)
    true = f(shifted(m, d, 1.0), b).float()
    e1 = relative_linearisation_error(true, dirs.f0, dirs.predict({"d": 1.0}))
    e2 = relative_linearisation_error(true, dirs.f0, dirs.predict({"d": 1.0}, second_order=True))
    assert e2 < e1 < 0.5


def test_linear_in_parameters_predictions_are_exact():
    """Perturbing only the (linear) head's input path: a model linear in its parameters is predicted exactly."""
    m, b = tiny(), batch()
    # the classifier weight enters linearly: f = pooled @ W.T + b, so f0 + J·Δ is exact
    g = torch.Generator().manual_seed(5)
    dw = torch.randn(3, 16, generator=g, dtype=torch.float64)
    dirs = directional_outputs(m, [b], {"head": {"head.linear.weight": dw}}, second_order=True)
    with torch.no_grad():
        m.head.linear.weight.add_(dw)
    assert torch.allclose(dirs.predict({"head": 1.0}), f(m, b).float(), atol=1e-5)
    assert dirs.hvps["head"].abs().max() < 1e-6


def test_vjp_is_the_adjoint_of_jvp():
    """⟨w, J·v⟩ = ⟨Jᵀ·w, v⟩ for random v, w (float64)."""
    from taskvec.linearize import vjp_params
    m, b = tiny(), batch()
    v = delta(m, seed=3)
    _, jv, _ = jvp_batch(m, b, v)
    w = torch.randn(jv.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    jtw = vjp_params(m, [b], w, list(v))
    lhs = float((w * jv.double()).sum())
    rhs = sum(float((jtw[k].double() * v[k]).sum()) for k in v)
    assert abs(lhs - rhs) <= 1e-5 * max(1.0, abs(lhs))


def test_jvp_many_equals_one_jvp_per_direction_and_vjp_many_equals_single_vjps():
    from taskvec.linearize import jvp_many, vjp_params, vjp_params_many

    m, b = tiny(), batch()
    d = delta(m)
    g = torch.Generator().manual_seed(5)
    dirs = [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in d.items()} for _ in range(3)]
    dirs[2] = {k: v for i, (k, v) in enumerate(dirs[2].items()) if i == 0}  # touches one tensor only
    f0, js = jvp_many(m, b, dirs)
    for dv, j in zip(dirs, js):
        f0r, jr, _ = jvp_batch(m, b, dv)
        assert torch.allclose(f0, f0r, atol=1e-6) and torch.allclose(j, jr, rtol=1e-5, atol=1e-6)
    dd = directional_outputs(m, [b], {str(i): x for i, x in enumerate(dirs)})
    dl = directional_outputs(m, [b], {str(i): x for i, x in enumerate(dirs)}, batched=False)
    assert all(torch.allclose(dd.jvps[k], dl.jvps[k], rtol=1e-5, atol=1e-6) for k in dl.jvps)
    n, o = f0.shape
    W = torch.randn(4, n, o, generator=g, dtype=torch.float64)
    many = vjp_params_many(m, [b], W, list(d))
    for i in range(4):
        one = vjp_params(m, [b], W[i], list(d))
        assert all(torch.allclose(many[k][i], one[k], rtol=1e-5, atol=1e-6) for k in d)


def test_float64_finite_difference_second_order_equals_the_nested_jvp_on_a_float32_model():
    from taskvec.linearize import finite_difference_derivatives

    m, b = tiny(torch.float32), batch()
    dirs = {"a": delta(m, 0.3, seed=8), "b": {k: v for i, (k, v) in enumerate(delta(m, 0.5, seed=9).items()) if i < 2}}
    nested = directional_outputs(m, [b], {k: {n: t.float() for n, t in v.items()} for k, v in dirs.items()},
                                 second_order=True, second_order_method="jvp")
    fd1, fd = finite_difference_derivatives(m, [b], {k: {n: t.float() for n, t in v.items()} for k, v in dirs.items()})
    m64 = tiny(torch.float64)
    for k in dirs:
        _, j64, exact = jvp_batch(m64, b, dirs[k], second_order=True)  # float64 nested JVP: the reference
        scale = float(exact.abs().max())
        assert float((fd[k].double() - exact.double()).abs().max()) <= 1e-4 * scale
        assert float((fd1[k].double() - j64.double()).abs().max()) <= 1e-5 * float(j64.abs().max())
        assert float((nested.hvps[k].double() - exact.double()).abs().max()) <= 1e-3 * scale
    # the default method of directional_outputs is the finite-difference one
    default = directional_outputs(m, [b], {"a": {n: t.float() for n, t in dirs["a"].items()}}, second_order=True)
    assert torch.allclose(default.hvps["a"], fd["a"]) and torch.allclose(default.jvps["a"], fd1["a"])


def test_fast_attention_switches_to_sdpa_and_restores_eager():
    from taskvec.linearize import fast_attention

    m, b = tiny(), batch()
    ref = f(m, b)
    assert m.backbone.config._attn_implementation == "eager"
    with fast_attention(m):
        assert m.backbone.config._attn_implementation == "sdpa"
        fast = f(m, b)
    assert m.backbone.config._attn_implementation == "eager"
    assert torch.allclose(fast, ref, atol=1e-10)


def test_linearize_does_not_import_the_kernel_package():
    """One-way chain ntk -> linearize -> modelfn: importing linearize loads neither taskvec.ntk nor its parts."""
    import subprocess
    import sys

    code = ("import sys, taskvec.linearize; "
            "print(sorted(m for m in sys.modules if m.startswith('taskvec.ntk')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_eval_mode_restores_each_training_flag_even_on_error():
    from taskvec.modelfn import eval_mode

    a, b = torch.nn.Dropout(), torch.nn.Dropout()
    b.eval()
    try:
        with eval_mode(a, b, a):
            assert not a.training and not b.training
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert a.training and not b.training


def test_one_sided_float64_differences_give_the_jvp_of_first_order_only_directions():
    """first_only directions: (f(θ0 + h1·Δ) − f(θ0)) / h1 on the float64 copy equals the float64 JVP to
    float32 resolution, beside the central differences of the other directions (which it does not change)."""
    from taskvec.linearize import finite_difference_derivatives

    m, b = tiny(torch.float32), batch()
    d32 = {k: {n: t.float() for n, t in v.items()} for k, v in
           {"a": delta(m, 0.3, seed=8), "c": delta(m, 0.05, seed=10)}.items()}
    first, second = finite_difference_derivatives(m, [b], {"a": d32["a"]}, first_only={"c": d32["c"]})
    alone, _ = finite_difference_derivatives(m, [b], {"a": d32["a"]})
    assert set(first) == {"a", "c"} and set(second) == {"a"} and torch.equal(first["a"], alone["a"])
    _, j64, _ = jvp_batch(tiny(torch.float64), b, {n: t.double() for n, t in d32["c"].items()})
    assert float((first["c"].double() - j64).abs().max()) <= 1e-4 * float(j64.abs().max())
    via = directional_outputs(m, [b], {"a": d32["a"]}, second_order=True, first_only={"c": d32["c"]})
    assert torch.equal(via.jvps["c"], first["c"]) and "c" not in via.hvps
    import pytest

    from taskvec.errors import TaskvecError
    with pytest.raises(TaskvecError, match="first_only"):
        directional_outputs(m, [b], {"a": d32["a"]}, first_only={"c": d32["c"]})
