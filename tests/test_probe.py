"""The probe-calibrated predictor (taskvec/validation/probe.py) against references from its definition."""

import math

import numpy as np
import pytest
import torch

from taskvec.validation.probe import calibrate, probe_positions, probe_prediction


def _synthetic(n=400, o=3, seed=0, alpha=0.6, beta=-0.3, gamma=-0.2, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    f0 = torch.randn(n, o, generator=g)
    a = 1.5 * torch.randn(n, o, generator=g)
    b = torch.randn(n, o, generator=g)
    c = torch.tensor([0.3, -0.1, 0.0][:o])
    true = f0 + alpha * a + beta * b + gamma * f0 + c + noise * torch.randn(n, o, generator=g)
    y = torch.randint(0, o, (n,), generator=g)
    return f0, a, b, true, y


def test_probe_positions_are_distinct_sorted_seeded_and_all_when_k_covers_n():
    p = probe_positions(100, 30, seed=3)
    assert p.numel() == 30 and len(set(p.tolist())) == 30 and torch.equal(p, p.sort().values)
    assert torch.equal(p, probe_positions(100, 30, seed=3)) and not torch.equal(p, probe_positions(100, 30, seed=4))
    assert torch.equal(probe_positions(10, 50), torch.arange(10))


def test_calibrate_recovers_the_coefficients_of_exact_data_and_falls_back_to_the_expansion():
    f0, a, b, true, _ = _synthetic(noise=0.0)
    cal = calibrate(f0, a, b, true, ridge=0.0)
    assert (cal.alpha, cal.beta, cal.gamma) == pytest.approx((0.6, -0.3, -0.2), abs=1e-6)
    assert torch.allclose(cal.intercept, torch.tensor([0.3, -0.1, 0.0]), atol=1e-5)
    assert torch.allclose(cal.apply(f0, a, b), true, atol=1e-5)
    # an enormous ridge: the plain second-order expansion f0 + a + b
    big = calibrate(f0[:5], a[:5], b[:5], true[:5], ridge=1e9)
    assert (big.alpha, big.beta, big.gamma) == pytest.approx((1.0, 1.0, 0.0), abs=1e-6)
    first_only = calibrate(f0, a, None, f0 + 0.5 * a, ridge=0.0)
    assert (first_only.alpha, first_only.beta, first_only.gamma) == pytest.approx((0.5, 0.0, 0.0), abs=1e-6)


def _reference(f0, a, b, y, pos, f_probe, folds, ridge):
    """probe_prediction written out example by example."""
    n, k = f0.shape[0], len(pos)
    pos = [int(p) for p in pos]
    full = calibrate(f0[pos], a[pos], b[pos], f_probe, ridge)
    errs = []
    for i, p in enumerate(pos):
        tr = [j for j in range(k) if j % folds != i % folds]
        c = calibrate(f0[[pos[j] for j in tr]], a[[pos[j] for j in tr]], b[[pos[j] for j in tr]], f_probe[tr], ridge)
        yhat = int(c.apply(f0[p:p + 1], a[p:p + 1], b[p:p + 1]).argmax() == y[p])
        errs.append(int(f_probe[i].argmax() == y[p]) - yhat)
    total = sum(int(f_probe[i].argmax() == y[p]) for i, p in enumerate(pos))
    for i in range(n):
        if i not in pos:
            total += int(full.apply(f0[i:i + 1], a[i:i + 1], b[i:i + 1]).argmax() == y[i])
    acc = (total + (n - k) * float(np.mean(errs))) / n
    se = (n - k) / n * math.sqrt((sum(e * e for e in errs) + 1) / (k + 1) / k)
    return acc, se


def test_probe_prediction_equals_the_reference_from_its_definition():
    f0, a, b, true, y = _synthetic(n=120)
    pos = probe_positions(120, 30, seed=1)
    got = probe_prediction(f0, a, b, y, pos, true[pos], folds=4, ridge=0.5)
    acc, se = _reference(f0, a, b, y, pos, true[pos], 4, 0.5)
    assert got["predicted"] == pytest.approx(acc, abs=1e-12)
    assert got["se"] == pytest.approx(se, abs=1e-12) and got["uncertainty"] == pytest.approx(200 * se)


def test_an_exact_expansion_or_a_probe_of_everything_predicts_the_measured_accuracy():
    f0, a, b, _, y = _synthetic()
    true = f0 + a + b  # the Taylor series is exact: the calibration keeps it, no probe example is wrong
    acc_true = float((true.argmax(-1) == y).double().mean())
    pos = probe_positions(len(y), 40, seed=0)
    got = probe_prediction(f0, a, b, y, pos, true[pos])
    assert got["predicted"] == pytest.approx(acc_true, abs=1e-12) and got["probe_error_rate"] == 0
    _, _, _, noisy, _ = _synthetic(noise=2.0)
    everything = torch.arange(len(y))
    all_in = probe_prediction(f0, a, b, y, everything, noisy)
    assert all_in["predicted"] == pytest.approx(float((noisy.argmax(-1) == y).double().mean()), abs=1e-12)
    assert all_in["se"] == 0.0


def test_the_rectified_estimate_is_unbiased_and_its_band_covers_when_the_expansion_is_biased():
    """Truth far from the expansion (a different mixture plus noise): over many probe draws the estimate is
    centred on the measured accuracy and ±uncertainty (2 se) covers it about 95% of the time."""
    f0, a, b, true, _ = _synthetic(n=500, alpha=0.2, beta=0.3, gamma=-0.6, noise=1.0, seed=5)
    y = (f0 + 0.5 * torch.randn(f0.shape, generator=torch.Generator().manual_seed(9))).argmax(-1)
    acc_true = float((true.argmax(-1) == y).double().mean())
    taylor = float(((f0 + a + b).argmax(-1) == y).double().mean())
    assert abs(taylor - acc_true) > 0.05  # the plain expansion is far off
    errs, covered = [], []
    for seed in range(60):
        pos = probe_positions(500, 60, seed=seed)
        p = probe_prediction(f0, a, b, y, pos, true[pos])
        errs.append(p["predicted"] - acc_true)
        covered.append(abs(p["predicted"] - acc_true) <= p["uncertainty"] / 100)
    assert abs(np.mean(errs)) < 3 * np.std(errs) / math.sqrt(len(errs)) < abs(taylor - acc_true)
    assert np.mean(covered) >= 0.85


def test_probe_prediction_refuses_an_empty_probe():
    f0, a, b, true, y = _synthetic(n=20)
    with pytest.raises(ValueError, match="at least one probe"):
        probe_prediction(f0, a, b, y, torch.zeros(0, dtype=torch.long), true[:0])


def test_probe_rows_are_the_evaluation_rows_at_their_positions(tiny_run):
    from taskvec.linearize import forward_outputs
    from taskvec.runs import Run
    from taskvec.validation.context import probe_subset

    run = Run.open(tiny_run, require="vectors")
    t = run.names[0]
    model = run.base_task_model(t)
    ev = run.eval_batches(t, 24)
    f, y = forward_outputs(model, ev)
    pos, pb = probe_subset(run, t, ev, 9, seed=2)
    fp, yp = forward_outputs(model, pb)
    assert sorted(pos.tolist()) == probe_positions(24, 9, 2).tolist()
    assert torch.equal(yp, y[pos]) and torch.allclose(fp, f[pos], atol=1e-5)


def test_validate_with_a_probe_of_every_example_predicts_flagged_merges_exactly(tiny_run, tmp_path):
    """With the whole evaluation subset as the probe, a flagged prediction is a measurement: it must equal the
    measured accuracy; with no probe every prediction is the Taylor one; probes are charged to the prediction."""
    from taskvec.validation import MergeSpec, validate_run

    merges = [MergeSpec("ta2", "task_arithmetic", {"lambda": 2.0}), MergeSpec("ties", "ties", {"density": 0.3})]
    kw = dict(merges=merges, n_eval=16, n_kernel=6, rank=2, lambdas=[1.0], progress=False, ntk_aware=False,
              n_holdout=0, max_uncertainty=-1.0)  # a threshold below 0 trusts no expansion: every row probed
    r = validate_run(tiny_run, n_probe=16, out=tmp_path / "all.json", **kw)
    rows = [e for m in r["merges"] for e in m["per_task"].values()]
    probed = [e for e in rows if e["predictor"] == "probe"]
    checked = [e for e in rows if "probe_check" in e]
    assert len(probed) + len(checked) == len(rows)  # every row flagged: each probed, or its expansion checked
    assert r["summary"].get("n_probed", 0) == len(probed)
    for e in probed:
        assert e["predicted"] == pytest.approx(e["measured"], abs=1e-12) and e["uncertainty"] == 0
    for e in checked:  # kept: the series converges and the whole-set probe finds its error within 2 se
        c = e["probe_check"]
        assert e["curvature"] < 1 and c["taylor_consistent"] and e["predictor"] == "taylor"
        assert c["taylor_bias"] == pytest.approx(e["measured"] - e["predicted"], abs=1e-9)
        assert abs(c["taylor_bias"]) <= 2 * c["taylor_bias_se"]
    assert r["compute"]["phases"]["probes"]["ops"]["forward"] > 0
    none = validate_run(tiny_run, n_probe=0, out=tmp_path / "none.json", **kw)
    assert all(e["predictor"] == "taylor" for m in none["merges"] for e in m["per_task"].values())
    assert "probes" not in none["compute"]["phases"] and "n_probed" not in none["summary"]
