"""Validation phases, each alone: scoring, the summary, the coefficient search; and the result object."""

import math

import numpy as np
import pytest
import torch

from taskvec.validation import ValidationResult, choose_coefficients, summarize
from taskvec.validation.predict import Scorer
from taskvec.validation.summary import calibration, spearman


def _entry(base, pred, meas, unc, trusted, pred1=None):
    return {"base": base, "predicted": pred, "predicted_1st": pred if pred1 is None else pred1,
            "measured": meas, "uncertainty": unc, "trusted": trusted}


def test_summarize_counts_errors_by_trust_by_hand():
    merges = [{"per_task": {"a": _entry(0.5, 0.60, 0.62, 0.3, True), "b": _entry(0.7, 0.65, 0.55, 4.0, False)}},
              {"per_task": {"a": _entry(0.5, 0.70, 0.69, 0.8, True), "b": _entry(0.7, 0.40, 0.50, 9.0, False,
                                                                                 pred1=0.45)}}]
    s = summarize(merges, second_order=True, max_uncertainty=1.0)
    assert s["n_predictions"] == 4 and s["n_trusted"] == 2 and s["n_untrusted"] == 2
    assert s["mae_points_trusted"] == pytest.approx(100 * (0.02 + 0.01) / 2)
    assert s["mae_points_untrusted"] == pytest.approx(100 * (0.10 + 0.10) / 2)
    assert s["mae_points"] == pytest.approx(100 * (0.02 + 0.10 + 0.01 + 0.10) / 4)
    assert s["mae_points_1st"] == pytest.approx(100 * (0.02 + 0.10 + 0.01 + 0.05) / 4)
    assert s["mae_points_nochange_baseline"] == pytest.approx(100 * (0.12 + 0.15 + 0.19 + 0.20) / 4)
    # predicted changes (0.10, -0.05, 0.20, -0.30) and measured (0.12, -0.15, 0.19, -0.20) rank alike
    assert s["spearman_change"] == pytest.approx(1.0)
    cal = {c["max_uncertainty"]: c for c in s["calibration"]}
    assert cal[0.5]["n"] == 1 and cal[1.0]["n"] == 2 and cal[5.0]["n"] == 3 and cal[None]["n"] == 4
    assert cal[None]["max_error_points"] == pytest.approx(10.0)
    assert "interference_spearman" not in s
    s1 = summarize(merges, second_order=False, max_uncertainty=1.0)
    assert s1["order"] == 1 and "calibration" not in s1


def test_summary_interference_spearman_uses_off_diagonal_entries():
    I_pred = np.array([[9.0, 0.1, 0.3], [0.2, -9.0, 0.5], [0.4, 0.6, 9.0]])
    I_meas = np.array([[-5.0, 1.0, 3.0], [2.0, 5.0, 5.0], [4.0, 6.0, 0.0]])
    s = summarize([{"per_task": {"a": _entry(0.5, 0.6, 0.6, 0.0, True)}}], True, 1.0, I_pred, I_meas)
    assert s["interference_spearman"] == pytest.approx(1.0)


def test_spearman_and_calibration_edge_cases():
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    cal = calibration([_entry(0.5, 0.5, 0.6, 2.5, False)])
    assert [c["n"] for c in cal] == [0, 0, 0, 0, 0, 1, 1, 1] and cal[0]["mae_points"] is None


def test_choose_coefficients_finds_the_optimum_of_a_known_score():
    names = ["a", "b"]
    target = {"a": 0.7, "b": 0.9}

    def score(cf):  # concave, maximum at the target (global optimum of the mean at λ = 0.8)
        return -sum((cf[t] - target[t]) ** 2 for t in names)

    lam, cf = choose_coefficients(score, names)
    assert lam == pytest.approx(0.8)
    assert cf == pytest.approx(target)
    # a flat score: every λ ties, the one nearest 0.5 is kept, and coordinate ascent keeps it
    lam, cf = choose_coefficients(lambda cf: 0.0, names)
    assert lam == pytest.approx(0.5) and cf == pytest.approx({"a": 0.5, "b": 0.5})


def test_scorer_entry_of_an_exactly_linear_change_is_exact_and_trusted():
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(40, 3, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    first = 0.5 * torch.randn(40, 3, generator=g)
    sc = Scorer(["t"], {"t": f0}, {"t": y}, {"t": float((f0.argmax(-1) == y).float().mean())},
                {"t": 0.9}, max_uncertainty=1.0)
    e = sc.entry("t", first, torch.zeros_like(first), f0 + first)
    assert e["predicted"] == e["measured"] == e["predicted_1st"]
    assert e["lin_error"] == pytest.approx(0.0, abs=1e-7) and e["curvature"] == 0.0 and e["trusted"]
    assert e["normalized_measured"] == pytest.approx(e["measured"] / 0.9)
    e1 = sc.entry("t", first, None, f0 + first)
    assert e1["trusted"] is False and e1["uncertainty"] is None
    assert sc.predicted_avg({"t": first}, None) == pytest.approx(e["measured"] / 0.9)


def test_validation_result_shows_a_summary_not_a_dump():
    r = ValidationResult({"tasks": ["a", "b"], "summary": {"n_predictions": 4, "spearman_change": 0.9,
                                                          "n_trusted": 1, "mae_points_trusted": 0.25},
                          "coefficients": {"lambda_star": 0.35}, "wall_time_s": 12.0, "merges": [1] * 1000})
    assert "Spearman (accuracy change): 0.900" in repr(r) and "λ* from predictions: 0.35" in repr(r)
    assert len(repr(r)) < 600 and "<table>" in r._repr_html_()
    assert r["summary"]["n_trusted"] == 1 and isinstance(r, dict)
    assert not math.isnan(r["wall_time_s"])


def test_ledger_counts_in_forward_pass_equivalents_and_times_phases():
    import time

    from taskvec.validation.costs import Ledger, prediction_cost

    led = Ledger(unit_examples=200)
    with led.phase("a"):
        led.add("forward", 100)  # half of the evaluation examples: 0.5 FPE
        led.add("forward64", 200, 3)
        time.sleep(0.02)
    with led.phase("b"):
        led.add("jvp_tangents", 50, 4)
    led.measure_seconds += [0.01, 0.03, 0.02]
    out = led.to_json()
    assert out["seconds_per_fpe"] == 0.02
    a = out["phases"]["a"]
    assert a["ops"] == {"forward": 0.5, "forward64": 3.0}
    assert a["seconds"] >= 0.02 and a["fpe_by_time"] == a["seconds"] / 0.02
    assert out["phases"]["b"]["ops"] == {"jvp_tangents": 1.0}
    assert prediction_cost(out, ("a", "b")) == a["fpe_by_time"] + out["phases"]["b"]["fpe_by_time"]
    assert prediction_cost(out, ("missing",)) is None
    with pytest.raises(ValueError, match="unknown operation"):
        led.add("backward", 1)
    assert Ledger(10).to_json()["seconds_per_fpe"] is None


def test_heldout_band_takes_its_sampling_error_from_the_measured_changes():
    import math

    from taskvec.validation.heldout import _entry as heldout_entry

    # predicted: no example flips (sd 0); measured: 20% of 100 examples flipped (sd 0.4): the held-out change of
    # 3 points is within u + 2·se only with the measured spread
    e = {"base": 0.80, "predicted": 0.80, "uncertainty": 0.5, "change_sd": 0.0, "change_sd_measured": 0.4, "n": 100}
    h = heldout_entry(e, measured=0.83, base=0.80, n_holdout=100)
    assert h["se_points_premerge"] == 0.0 and not h["within_band_premerge"]
    assert math.isclose(h["se_points"], 100 * 0.4 * math.sqrt(0.02)) and h["within_band"]
    assert math.isclose(h["error_points"], 3.0)
    legacy = heldout_entry({k: v for k, v in e.items() if k != "change_sd_measured"}, 0.83, 0.80, 100)
    assert legacy["se_points"] == 0.0 and not legacy["within_band"]  # entries saved before: the predicted spread
