import json

import numpy as np
import pytest
import torch

from taskvec.interference import MergeSpec, merge_vectors, subspace_overlap, top_eigenspace, validate_run
from taskvec.task_vector import TaskVector


def _explicit_V(J, r):
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    return Vh[:r].T  # (p, r) top right singular vectors = J^T U Σ^-1


def test_overlap_matches_explicit_parameter_space_vectors():
    g = torch.Generator().manual_seed(0)
    p, r = 400, 5
    shared = torch.randn(8, p, generator=g, dtype=torch.float64)
    JA = torch.cat([shared, torch.randn(12, p, generator=g, dtype=torch.float64)])
    JB = torch.cat([shared + 0.1 * torch.randn(8, p, generator=g, dtype=torch.float64),
                    torch.randn(12, p, generator=g, dtype=torch.float64)])
    A, B = top_eigenspace(JA @ JA.T, r), top_eigenspace(JB @ JB.T, r)
    got = subspace_overlap(A, B, JA @ JB.T)
    VA, VB = _explicit_V(JA, r), _explicit_V(JB, r)
    want = float(((VA.T @ VB) ** 2).sum()) / r
    assert abs(got["overlap"] - want) < 1e-8
    assert abs(subspace_overlap(A, A, JA @ JA.T)["overlap"] - 1.0) < 1e-8  # a task against itself


def test_overlap_of_unrelated_tasks_is_near_the_random_baseline():
    g = torch.Generator().manual_seed(1)
    p, r = 2000, 4
    vals = []
    for _ in range(10):
        JA = torch.randn(20, p, generator=g, dtype=torch.float64)
        JB = torch.randn(20, p, generator=g, dtype=torch.float64)
        vals.append(subspace_overlap(top_eigenspace(JA @ JA.T, r), top_eigenspace(JB @ JB.T, r), JA @ JB.T)["overlap"])
    assert 0.3 * r / p < np.mean(vals) < 3 * r / p


def test_merge_vectors_task_arithmetic_and_ties():
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    tvs = [TaskVector({k: torch.randn(v.shape, generator=g) for k, v in base.items()}) for _ in range(3)]
    ta = merge_vectors(tvs, "task_arithmetic", base, **{"lambda": 0.7})
    for k in base:
        assert torch.allclose(ta[k], 0.7 * sum(t.deltas[k] for t in tvs), atol=1e-6)
    from taskvec.merge.methods import get_method
    ties = merge_vectors(tvs, "ties", base, density=0.4)
    ref = get_method("ties")(base["w"], [t.deltas["w"].clone() for t in tvs], [1.0] * 3, density=[0.4] * 3)
    assert torch.equal(ties["w"], ref)


def test_validate_run_end_to_end(tiny_run):
    r = validate_run(tiny_run, merges=[MergeSpec("ta", "task_arithmetic", {"lambda": 0.5}),
                                       MergeSpec("ties", "ties", {"density": 0.3})],
                     n_eval=24, n_kernel=12, rank=3, lambdas=[0.5, 1.0], progress=False)
    saved = json.loads((tiny_run / "validation" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(r["summary"]))
    T = len(r["tasks"])
    assert np.array(r["interference"]["predicted"]).shape == (T, T)
    assert len(r["disentanglement"]) == T * (T - 1) // 2
    names = [m["name"] for m in r["merges"]]
    assert names[:2] == ["ta", "ties"] and any(n.startswith("ntk_aware") for n in names)
    for m in r["merges"]:
        for e in m["per_task"].values():
            assert 0 <= e["predicted"] <= 1 and 0 <= e["measured"] <= 1 and e["lin_error"] >= 0
            if e["predictor"] == "taylor":  # the headline: second order where the band trusts it
                assert e["predicted"] == e["predicted_2nd"]
                assert e["trusted"] == (e["uncertainty"] <= 1.0 and e["curvature"] < 1)
            else:  # flagged: calibrated on a probe of the merged model (probe.py), the expansion kept beside it
                assert e["predictor"] == "probe" and e["predicted_taylor"] == e["predicted_2nd"]
                assert not e["trusted_taylor"] and e["trusted"] == (e["uncertainty"] <= 1.0)
                assert e["probe"]["n_probe"] == r["n_probe"] == 4
    eig = r["eigen"]
    assert np.allclose(np.diag(eig["overlap"]), 1.0)
    assert all(0 <= x <= 1 + 1e-9 for row in eig["overlap"] for x in row)
    assert eig["random_baseline"] == pytest.approx(3 / eig["p"])
    assert set(r["finetuned_accuracy"]) == set(r["tasks"])
    assert r["coefficients"]["grid_evaluations"] == 2 and r["coefficients"]["chosen_evaluations"] == 1
    calib = r["summary"]["calibration"]
    assert [c["n"] for c in calib] == sorted(c["n"] for c in calib) and calib[-1]["n"] == r["summary"]["n_predictions"]
    assert r["summary"]["n_trusted"] + r["summary"]["n_untrusted"] == r["summary"]["n_predictions"]
    assert set(r["timings_s"]) >= {"eigenspaces", "predictions", "measurements_and_search", "heldout"}
    # every claim checked again on test examples the predictor did not see
    h = r["summary"]["heldout"]
    from taskvec.linearize import accuracy, forward_outputs
    from taskvec.runs import Run

    run = Run.open(tiny_run, require="vectors")
    for t in r["tasks"]:
        idx = run.holdout(t, 24)
        assert h["n_holdout"][t] == len(idx) == 6 and not set(idx) & set(run.sample(t, "test", 24))
        f, y = forward_outputs(run.base_task_model(t), run.batches(t, idx))
        assert h["base_accuracy"][t] == pytest.approx(accuracy(f, y))
    for m in r["merges"]:
        for e in m["per_task"].values():
            ho = e["heldout"]
            assert ho["error_points"] == pytest.approx(
                100 * abs((e["predicted"] - e["base"]) - (ho["measured"] - ho["base"])))
            assert ho["band_points"] >= 2 * ho["se_points"] >= 0
    assert h["n_trusted"] == r["summary"]["n_trusted"]
    assert h["coefficients"]["grid_best_lambda"] == r["coefficients"]["grid_best_lambda"]
    # compute, in forward-pass equivalents (FPE: one float32 forward over every task's evaluation examples)
    c = r["compute"]
    n_eval = sum(r["n_eval"].values())
    assert c["unit_examples"] == n_eval and c["seconds_per_fpe"] > 0
    ph = c["phases"]
    # measurements: 1 FPE each — singles T, the 2 configured merges, pairs, the grid, 2 chosen, 3 NTK-aware/TA
    assert ph["singles"]["ops"]["forward"] == pytest.approx(T)
    assert ph["merges"]["ops"]["forward"] == pytest.approx(2)
    assert ph["interference"]["ops"]["forward"] == pytest.approx(T * (T - 1) / 2)
    assert ph["coefficients"]["ops"]["forward"] == pytest.approx(2 + 2)
    assert ph["ntk_aware_merges"]["ops"]["forward"] == pytest.approx(3)
    assert sum(p["ops"].get("forward", 0) for k, p in ph.items() if k in (
        "singles", "merges", "interference", "coefficients", "ntk_aware_merges")) == pytest.approx(r["evaluations"])
    # predictions: per task the float32 f0 and float64 forwards: f(θ0), one per τ (one-sided), two per other
    # direction (Σ τ, TIES and the two NTK-aware sums: central): summed over the tasks, in FPE
    pred = ph["predictions"]["ops"]
    assert pred["forward"] == pytest.approx(1) and "jvp_tangents" not in pred
    assert pred["forward64"] == pytest.approx(1 + T + 2 * 4)
    assert c["prediction_fpe"] == pytest.approx(ph["predictions"]["fpe_by_time"]) and c["grid_fpe"] == 2
    assert ph["heldout"]["ops"]["forward"] > 0 and ph["eigenspaces"]["ops"]["reverse"] > 0
    assert c["total"]["seconds"] == pytest.approx(sum(p["seconds"] for p in ph.values()))


def test_eigenspace_component_is_the_orthogonal_projection():
    """V Vᵀ δ computed by JVP + VJP equals the explicit projection on the top right singular vectors of J."""
    from transformers import BertConfig, BertModel

    from taskvec.interference import _flat_kernel, eigenspace_component
    from taskvec.modeling import HeadSpec, LinearHead, TaskModel
    from taskvec.ntk import empirical_ntk

    torch.manual_seed(0)
    bb = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=16, attn_implementation="eager"))
    m = TaskModel(bb, LinearHead(8, 2), HeadSpec("linear", "mean", 2)).double().eval()
    ids = torch.randint(1, 50, (6, 5), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(6, dtype=torch.long)}
    K = _flat_kernel(empirical_ntk(m, batch, params="qkv", kernel="full", groups=False))
    space = top_eigenspace(K, 3)
    names = [n for n, _ in m.backbone.named_parameters() if "attention.self" in n and n.endswith("weight")]
    g = torch.Generator().manual_seed(2)
    delta = {n: torch.randn(dict(m.backbone.named_parameters())[n].shape, generator=g, dtype=torch.float64)
             for n in names}
    got = eigenspace_component(m, [batch], space, delta)
    # explicit Jacobian (n·o × p) by autograd, rows ordered (example, output)
    params = [dict(m.backbone.named_parameters())[n] for n in names]
    out = m(batch["input_ids"], batch["attention_mask"])
    rows = []
    for i in range(6):
        for a in range(2):
            gr = torch.autograd.grad(out[i, a], params, retain_graph=True)
            rows.append(torch.cat([x.reshape(-1) for x in gr]))
    J = torch.stack(rows)
    V = torch.linalg.svd(J, full_matrices=False).Vh[:3].T
    flat = torch.cat([delta[n].reshape(-1) for n in names])
    want = V @ (V.T @ flat)
    got_flat = torch.cat([got[n].double().reshape(-1) for n in names])
    assert torch.allclose(got_flat, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def _tiny_task_models():
    from transformers import BertConfig, BertModel

    from taskvec.modeling import HeadSpec, LinearHead, TaskModel

    torch.manual_seed(0)
    bb = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=16, attn_implementation="eager"))
    mA = TaskModel(bb, LinearHead(8, 2), HeadSpec("linear", "mean", 2)).double().eval()
    mB = TaskModel(bb, LinearHead(8, 3), HeadSpec("linear", "mean", 3)).double().eval()
    g = torch.Generator().manual_seed(1)

    def batch(n):
        ids = torch.randint(1, 50, (n, 5), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(n, dtype=torch.long)}

    names = [n for n, _ in bb.named_parameters() if "attention.self" in n and n.endswith("weight")]
    return mA, mB, batch(6), batch(5), names


def test_basis_overlap_equals_the_cross_kernel_overlap_and_bases_are_orthonormal():
    from taskvec.interference import _flat_kernel, basis_inner, basis_overlap, eigenspace_basis
    from taskvec.ntk import empirical_ntk

    mA, mB, bA, bB, names = _tiny_task_models()
    KA = _flat_kernel(empirical_ntk(mA, bA, params="qkv", kernel="full", groups=False))
    KB = _flat_kernel(empirical_ntk(mB, bB, params="qkv", kernel="full", groups=False))
    KAB = _flat_kernel(empirical_ntk(mA, bA, bB, params="qkv", kernel="full", groups=False, model2=mB))
    A, B = top_eigenspace(KA, 4), top_eigenspace(KB, 3)
    VA, VB = eigenspace_basis(mA, [bA], A, names), eigenspace_basis(mB, [bB], B, names)
    assert all(v.shape[0] == 4 for v in VA.values()) and all(v.shape[0] == 3 for v in VB.values())
    assert torch.allclose(basis_inner(VA, VA), torch.eye(4, dtype=torch.float64), atol=1e-5)
    want = subspace_overlap(A, B, KAB)
    got = basis_overlap(VA, VB)
    assert abs(got["overlap"] - want["overlap"]) < 1e-5
    assert np.allclose(got["cosines"], want["cosines"], atol=1e-5)


def test_trust_band_exact_linear_prediction_is_trusted_and_curvature_untrusts():
    from taskvec.interference import trust_band

    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(200, 3, generator=g)
    first = 0.5 * torch.randn(200, 3, generator=g)
    band = trust_band(first, torch.zeros_like(first), f0 + first)  # no curvature: the prediction is exact
    assert band == {"curvature": 0.0, "uncertainty": 0.0, "trusted": True}
    half = 0.4 * torch.randn(200, 3, generator=g)
    band = trust_band(first, half, f0 + first + half)
    rho = float(half.norm() / first.norm())
    assert band["curvature"] == pytest.approx(rho)
    pred = f0 + first + half
    top = pred.topk(2, -1).values
    want = 100 * float(((top[:, 0] - top[:, 1]) <= 2 * rho * half.abs().amax(-1)).float().mean())
    assert band["uncertainty"] == pytest.approx(want) and band["uncertainty"] > 1.0
    assert band["trusted"] is False
    # a second-order term larger than the first is never trusted, whatever the margins
    assert trust_band(first, 3 * first, 100 * torch.eye(3)[torch.arange(200) % 3], 100.0)["trusted"] is False


def test_loss_raising_coefficients_keep_only_the_harmful_part():
    from taskvec.interference import loss_raising_coefficients

    g = torch.Generator().manual_seed(3)
    n_o, r = 30, 6
    U = torch.linalg.qr(torch.randn(n_o, r, generator=g, dtype=torch.float64)).Q
    sigma = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
    resid = torch.randn(n_o, generator=g, dtype=torch.float64)
    c = torch.randn(r, generator=g, dtype=torch.float64)
    gproj = U.T @ resid
    harm = loss_raising_coefficients(c, gproj)

    def dloss(coef):  # first-order loss change of moving by Σ_j coef_j V_j (outputs move by U Σ coef)
        return float(-(resid @ (U @ (sigma * coef))))

    assert all(dloss(torch.eye(r, dtype=torch.float64)[j] * harm[j]) >= 0 for j in range(r))
    assert dloss(c - harm) <= min(dloss(c), 0.0) + 1e-12  # what is left never raises the loss
    assert torch.equal(harm + loss_raising_coefficients(-c, gproj) * -1, c)  # every component is one or the other


def test_heldout_checks_the_tasks_that_have_held_out_examples(tiny_run, tmp_path, monkeypatch):
    """A task whose test split has nothing beyond its evaluation subset is left out of the held-out check (was:
    the whole check skipped); the others are checked and the coefficient choices keep every task's τ."""
    from taskvec.runs import Run

    orig = Run.holdout
    monkeypatch.setattr(Run, "holdout", lambda self, name, *a, **k: [] if name == "a" else orig(self, name, *a, **k))
    r = validate_run(tiny_run, merges=[MergeSpec("ta", "task_arithmetic", {"lambda": 0.5})], n_eval=24, n_kernel=6,
                     rank=2, lambdas=[0.5], progress=False, out=tmp_path / "r.json", ntk_aware=False)
    h = r["summary"]["heldout"]
    assert h["tasks_without_holdout"] == ["a"] and set(h["tasks"]) == {"b", "c"} and "a" not in h["n_holdout"]
    for m in r["merges"]:
        assert "heldout" not in m["per_task"]["a"] and all("heldout" in m["per_task"][t] for t in ("b", "c"))
    assert h["calibration"][-1]["n"] == 2 * len(r["merges"])
    assert 0 <= h["calibration"][-1]["coverage"] <= 1
