"""Predictions from the linearised next-token logits (taskvec.lm_predict.lm_expansions) on a tiny random
Llama LM task model: the log-likelihood derivatives equal the loglik-output JVPs, a direction the logits are
linear in is predicted exactly at any step, the second-order error is third order, remainders bound it."""

import torch

from tests.test_lm_predict import lm_batch, lm_model, qkv_delta, shifted
from taskvec.lm_predict import (lm_expansions, logit_trust_band, loglik_derivatives, mean_nll_change,
                                measured_logliks)


def norm_delta(m, scale, seed):
    """A direction on the final RMSNorm weight: logits = (ĥ ⊙ w)·Eᵀ are linear in w."""
    g = torch.Generator().manual_seed(seed)
    w = m.backbone.norm.weight
    return {"norm.weight": scale * torch.randn(w.shape, generator=g, dtype=w.dtype)}


def test_loglik_derivatives_from_the_logits_equal_the_loglik_jvps():
    m = lm_model()
    batch, _ = lm_batch()
    dirs = {"a": qkv_delta(m, 0.3, 2), "b": qkv_delta(m, 0.2, 3)}
    want = loglik_derivatives(m, [batch], dirs, max_memory=float("inf"))
    der, pred = lm_expansions(m, [batch], dirs, {"a": {"a": 1.0}}, max_memory=float("inf"))
    assert torch.allclose(der.f0, want.f0, atol=1e-5)
    assert der.n_tokens.tolist() == want.n_tokens.tolist() == [2, 5, 1, 3]
    for d in dirs:
        assert torch.allclose(der.first[d], want.first[d], rtol=1e-4, atol=1e-5)
        assert torch.allclose(der.half_second[d], want.half_second[d], rtol=1e-3, atol=1e-4)
    assert pred.second["a"] and pred.remainder["a"].min() >= 0


def test_a_direction_the_logits_are_linear_in_is_predicted_exactly_at_any_step():
    m = lm_model()
    batch, _ = lm_batch()
    d = norm_delta(m, 1.0, 5)
    for step in (0.1, 1.0, 3.0):
        der, pred = lm_expansions(m, [batch], {"n": d}, {"x": {"n": step}}, max_memory=float("inf"))
        true = measured_logliks(shifted(m, d, step), [batch])
        assert float((true - der.f0).abs().max()) > 1e-2 * step  # the step does move the log-likelihoods
        # first-order logits are exact; float32 round-off of the logits only (RMSNorm runs in float32)
        assert torch.allclose(pred.predicted_1st["x"], true, atol=1e-4)
        assert torch.allclose(pred.predicted["x"], true, atol=1e-4)
        assert pred.curvature["x"] < 1e-4 and float(pred.remainder["x"].max()) < 1e-4
        # the log-likelihood's own Taylor series is not exact there (log-softmax is not linear)
        if step >= 1.0:
            taylor = der.predict({"n": step})
            assert float((taylor - true).abs().max()) > 1e-3


def test_second_order_logits_error_is_third_order_and_combinations_add_directions():
    m = lm_model()
    batch, _ = lm_batch()
    a, b = qkv_delta(m, 0.3, 2), qkv_delta(m, 0.2, 3)
    ab = {k: a[k] + b[k] for k in a}
    err1, err2 = [], []
    for h in (0.2, 0.1):
        der, pred = lm_expansions(m, [batch], {"ab": ab, "a": a, "b": b},
                                  {"x": {"ab": h}, "lin": {"a": h, "b": h}}, second_order=["ab"],
                                  max_memory=float("inf"))
        true = measured_logliks(shifted(m, ab, h), [batch])
        err1.append(float((pred.predicted_1st["x"] - true).norm()))
        err2.append(float((pred.predicted["x"] - true).norm()))
        # first order is linear in the directions: Σ_d c_d J Δ_d is J(Σ c_d Δ_d)
        assert torch.allclose(pred.predicted_1st["lin"], pred.predicted_1st["x"], atol=1e-5)
        assert not pred.second["lin"] and pred.curvature["lin"] == float("inf") and "lin" not in pred.remainder
    assert 3.0 < err1[0] / err1[1] < 5.0
    assert 6.0 < err2[0] / err2[1] < 10.0 and err2[1] < err1[1] / 5


def test_logit_trust_band_states_the_change_in_nats_per_token():
    m = lm_model()
    batch, _ = lm_batch()
    a = qkv_delta(m, 0.3, 2)
    der, pred = lm_expansions(m, [batch], {"a": a}, {"x": {"a": 0.2}, "far": {"a": 3.0}}, max_memory=float("inf"))
    true = measured_logliks(shifted(m, a, 0.2), [batch])
    band = logit_trust_band(pred, "x", der.f0, der.n_tokens, max_uncertainty=1.0)
    assert abs(band["predicted_change"] - mean_nll_change(true - der.f0, der.n_tokens)) < 1e-3
    assert band["uncertainty"] == float(pred.remainder["x"].sum()) / 11
    assert band["trusted"] == (band["curvature"] < 1 and band["uncertainty"] <= 1.0)
    far = logit_trust_band(pred, "far", der.f0, der.n_tokens)
    assert far["curvature"] > band["curvature"] and far["uncertainty"] > band["uncertainty"]


def test_the_hidden_state_path_equals_the_logits_path(monkeypatch):
    from taskvec import lm_predict

    m = lm_model()
    batch, _ = lm_batch()
    dirs = {"a": qkv_delta(m, 0.3, 2), "b": qkv_delta(m, 0.2, 3)}
    combos = {"x": {"a": 0.5}, "y": {"a": 1.0, "b": 1.0}}
    assert lm_predict.head_weight(m, dirs) is m.backbone.embed_tokens.weight  # tied, untouched: hidden states
    assert lm_predict.head_weight(m, {"e": {"embed_tokens.weight": m.backbone.embed_tokens.weight}}) is None
    der_h, pred_h = lm_expansions(m, [batch], dirs, combos, max_memory=float("inf"))
    monkeypatch.setattr(lm_predict, "head_weight", lambda model, d: None)
    der_z, pred_z = lm_expansions(m, [batch], dirs, combos, max_memory=float("inf"))
    for d in dirs:
        assert torch.allclose(der_h.first[d], der_z.first[d], rtol=1e-5, atol=1e-6)
        assert torch.allclose(der_h.half_second[d], der_z.half_second[d], rtol=1e-5, atol=1e-6)
    for c in combos:
        assert torch.allclose(pred_h.predicted[c], pred_z.predicted[c], rtol=1e-6, atol=1e-6)
        assert torch.allclose(pred_h.remainder[c], pred_z.remainder[c], rtol=1e-4, atol=1e-7)
        assert abs(pred_h.curvature[c] - pred_z.curvature[c]) < 1e-5 * max(pred_z.curvature[c], 1)


def test_a_small_memory_budget_chunks_without_changing_the_results():
    from taskvec.linearize import jvp_plan
    from taskvec.lm_predict import FeatureModel

    m = lm_model(torch.float32)
    batch, _ = lm_batch()
    dirs = {"a": qkv_delta(m, 0.3, 2), "b": qkv_delta(m, 0.2, 3)}
    combos = {"x": {"a": 0.5}}
    budget = 100_000  # bytes: one example along one direction of the hidden-state JVPs fits, two do not
    plan = jvp_plan(FeatureModel(m), batch, list(dirs.values()), budget, "token_logits")
    assert plan.examples == 1 and plan.directions == 1  # the budget does split the batch
    der_c, pred_c = lm_expansions(m, [batch], dirs, combos, max_memory=budget)
    der, pred = lm_expansions(m, [batch], dirs, combos, max_memory=float("inf"))
    for d in dirs:
        assert torch.allclose(der_c.first[d], der.first[d], rtol=1e-5, atol=1e-6)
        assert torch.allclose(der_c.half_second[d], der.half_second[d], rtol=1e-5, atol=1e-6)
    assert torch.allclose(pred_c.predicted["x"], pred.predicted["x"], atol=1e-6)
