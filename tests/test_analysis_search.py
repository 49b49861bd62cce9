"""analysis/search_vs_prediction.py on a tiny run: the searches spend exactly their budgets, every reported
number comes from the run, and the held-out scores are the held-out measurements of the choices."""

import json

import pytest
from conftest import load_script

pytest.importorskip("cma")


def _module():
    return load_script("search_vs_prediction")


def test_search_vs_prediction_on_a_tiny_run(tiny_run, tmp_path):
    mod = _module()
    assert mod.main(["--run", str(tiny_run), "--n-eval", "12", "--n-holdout", "12", "--seeds", "2",
                     "--factors", "1", "2", "5", "--max-evaluations", "6", "--results-dir", str(tmp_path),
                     "--name", "tiny"]) == 0
    data = json.loads((tmp_path / "search_vs_prediction_tiny.json").read_text())
    assert (tmp_path / "search_vs_prediction_tiny.png").stat().st_size > 0
    b = data["budgets"]
    assert [b[k] for k in ("1", "2", "5")] == sorted(b.values()) and 1 <= b["5"] <= 6
    # 10 grid evaluations + 2 seeds × 2 searches × the largest budget, nothing else measured
    assert data["evaluations"] == 10 + 2 * 2 * b["5"]
    assert data["prediction"]["fpe"] == pytest.approx(data["prediction"]["seconds"] / data["seconds_per_fpe"])
    assert all(mod.LOW <= c <= mod.HIGH for c in data["prediction"]["coefficients"])
    for curve in data["curves"].values():
        assert all(len(v) == 2 and all(0 <= x <= 2 for x in v) for v in curve.values())
    text = (tmp_path / "search_vs_prediction_tiny.md").read_text()
    assert f"{100 * data['prediction']['heldout']:.2f}%" in text


def test_searches_spend_their_budget_and_keep_the_best(monkeypatch):
    mod = _module()

    class Fake:
        names = ["a", "b"]
        evaluations = 0

        def measured(self, c):
            self.evaluations += 1
            return -((c[0] - 1.0) ** 2 + (c[1] - 0.3) ** 2)

    for search in (mod.random_search, mod.cma_search):
        f = Fake()
        trace = search(f, 37, seed=0)
        assert len(trace) == 37 == f.evaluations
        vals = [v for v, _ in trace]
        assert vals == sorted(vals)  # best-so-far never gets worse
        assert all(mod.LOW <= x <= mod.HIGH for x in trace[-1][1])
    assert mod.cma_search(Fake(), 200, seed=0)[-1][0] > -1e-3  # CMA-ES finds the optimum of a bowl
