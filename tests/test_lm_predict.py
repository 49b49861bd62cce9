"""Per-example log-likelihood as a model output (modelfn 'loglik'), its JVPs, second-order predictions, the
eNTK on it and the trust band in nats (taskvec.lm_predict), on a tiny random Llama LM task model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from taskvec import lm_metrics as lm
from taskvec.lm_objective import make_lm_model
from taskvec.lm_predict import loglik_derivatives, mean_nll_change, measured_logliks, trust_band_nats
from taskvec.modelfn import reduce_outputs
from taskvec.tasks import Task


def lm_model(dtype=torch.float64):
    torch.manual_seed(0)
    bb = LlamaModel(LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                                tie_word_embeddings=True, attn_implementation="eager", pad_token_id=0))
    with torch.no_grad():
        bb.embed_tokens.weight.mul_(20.0)
    task = Task("t", ["a", "b", "c"], [0, 1, 0], ["x", "y"])
    return make_lm_model(bb, task).to(dtype).eval()


def lm_batch():
    """4 (context, continuation) pairs of different lengths, right-padded, as LMBatches makes them."""
    g = torch.Generator().manual_seed(1)
    lens = [(3, 2), (1, 5), (4, 1), (2, 3)]
    pairs = [(torch.randint(1, 40, (a,), generator=g).tolist(), torch.randint(1, 40, (c,), generator=g).tolist())
             for a, c in lens]
    b = lm.build_batch(pairs, pad_id=0)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels()}, b


def qkv_delta(m, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {n[len("backbone."):]: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in m.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))}


def shifted(m, d, eps):
    import copy

    m2 = copy.deepcopy(m)
    params = dict(m2.backbone.named_parameters())
    with torch.no_grad():
        for k, v in d.items():
            params[k].add_(eps * v)
    return m2


def test_loglik_output_is_the_summed_continuation_log_likelihood():
    m = lm_model()
    batch, b = lm_batch()
    with torch.no_grad():
        logits = m(batch["input_ids"], batch["attention_mask"])
    got = reduce_outputs(logits, batch["labels"], "loglik")[:, 0]
    want, n = lm.continuation_logliks(lm.token_logprobs(logits, b.target_ids), b.target_mask)
    assert torch.allclose(got.double(), want, atol=1e-10)
    assert n.tolist() == [2, 5, 1, 3]
    with pytest.raises(ValueError, match="use output='loglik'"):
        reduce_outputs(logits, batch["labels"], "logits")


def test_jvps_and_second_order_equal_finite_differences_and_the_error_is_third_order():
    m = lm_model()
    batch, _ = lm_batch()
    dirs = {"a": qkv_delta(m, 0.3, 2), "b": qkv_delta(m, 0.2, 3)}
    der = loglik_derivatives(m, [batch], dirs, max_memory=float("inf"))
    f0 = measured_logliks(m, [batch])
    assert torch.allclose(der.f0, f0, atol=1e-5)  # the JVP runs in float32, f0 from a float64 forward
    # Llama's RMSNorm runs in float32 even in a float64 model (round-off ~1e-6 nats here), so the steps are
    # large: 1e-3 for the first difference, 3e-2 for the second (truncation ~1e-3 of the terms)
    for d, delta in dirs.items():
        e1, e2 = 1e-3, 3e-2
        fp, fm = measured_logliks(shifted(m, delta, e1), [batch]), measured_logliks(shifted(m, delta, -e1), [batch])
        assert torch.allclose(der.first[d], (fp - fm) / (2 * e1), rtol=1e-3, atol=1e-3)
        fp, fm = measured_logliks(shifted(m, delta, e2), [batch]), measured_logliks(shifted(m, delta, -e2), [batch])
        assert torch.allclose(der.half_second[d], 0.5 * (fp - 2 * f0 + fm) / e2 ** 2, rtol=1e-2, atol=2e-3)
    # along Δ, the first-order error shrinks as h², the second-order one as h³
    err1, err2 = [], []
    for h in (0.2, 0.1):
        true = measured_logliks(shifted(m, dirs["a"], h), [batch])
        err1.append(float((der.f0 + h * der.first["a"] - true).norm()))
        err2.append(float((der.predict({"a": h}) - true).norm()))
    assert 3.0 < err1[0] / err1[1] < 5.0
    assert 6.0 < err2[0] / err2[1] < 10.0 and err2[1] < err1[1] / 5


def test_entk_on_the_loglik_output_is_the_gram_of_per_example_gradients():
    from taskvec.ntk import empirical_ntk

    m = lm_model(torch.float32)
    batch, _ = lm_batch()
    K = empirical_ntk(m, batch, params="qkv", output="loglik", kernel="full").kernel.double().reshape(4, 4)
    names = [n for n, _ in m.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
    params = dict(m.named_parameters())
    rows = []
    for i in range(4):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        ll = reduce_outputs(m(one["input_ids"], one["attention_mask"]), one["labels"], "loglik")[0, 0]
        gs = torch.autograd.grad(ll, [params[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in gs]).double())
    G = torch.stack(rows)
    assert torch.allclose(K, G @ G.T, rtol=1e-4, atol=1e-4 * float(K.abs().max()))


def test_trust_band_in_nats_by_hand():
    first = torch.tensor([1.0, -2.0, 0.5])
    half = torch.tensor([0.1, 0.2, -0.2])
    n = torch.tensor([2, 3, 5])
    t = trust_band_nats(first, half, n, max_uncertainty=0.01)
    rho = 0.3 / (5.25 ** 0.5)  # ‖half‖ = 0.3, ‖first‖ = √5.25
    assert t["curvature"] == pytest.approx(rho)
    assert t["uncertainty"] == pytest.approx(rho * 0.5 / 10)
    assert t["predicted_change"] == pytest.approx(-(-0.5 + 0.1) / 10)
    assert t["predicted_change_1st"] == pytest.approx(0.05)
    assert t["trusted"] == (rho * 0.05 <= 0.01)
    assert mean_nll_change(torch.tensor([-1.0, -1.0]), torch.tensor([1, 3])) == pytest.approx(0.5)
