"""The outcome study's post hoc policies (analysis/spectral_study.py), on hand-written curves."""

import importlib.util
from pathlib import Path

import pytest

from taskvec.tasks import Splits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("spectral_study", ROOT / "analysis" / "spectral_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _curve(vals, key="val_loss", every=10):
    return [{"step": every * i, key: v} for i, v in enumerate(vals)]


def test_patience_replays_the_loop(study):
    # best at step 20; two evaluations without improvement stop the replay before the later, lower minimum
    c = _curve([1.0, 0.9, 0.8, 0.85, 0.81, 0.5])
    assert study.patience_step(c, 2) == 20
    assert study.patience_step(c, 3) == 50
    # never improves: keeps the first evaluation
    assert study.patience_step(_curve([1.0, 1.1, 1.2]), 2) == 0


def test_fixed_budget_is_the_lowest_mean_over_seeds(study):
    a = _curve([1.0, 0.4, 0.9], key="test_loss")
    b = _curve([1.0, 0.9, 0.5], key="test_loss")
    # means: step 0 → 1.0, 10 → 0.65, 20 → 0.7
    assert study.fixed_budget_step([a, b], "test_loss") == 10
    # only steps every curve evaluated count
    c = [{"step": 0, "test_loss": 1.0}, {"step": 20, "test_loss": 0.1}]
    assert study.fixed_budget_step([a, c], "test_loss") == 20


def test_gain_holdout_is_a_seeded_subset(study):
    s = Splits(list(range(10)), list(range(10, 40)), list(range(40, 60)), 0, {})
    assert study.gain_holdout(s, 0, {}) == s.val
    assert study.gain_holdout(s, 0, {"data_gain": {"val_examples": None}}) == s.val
    v = study.gain_holdout(s, 1, {"data_gain": {"val_examples": 8}})
    assert len(v) == 8 and set(v) <= set(s.val) and v == sorted(v)
    assert v == study.gain_holdout(s, 1, {"data_gain": {"val_examples": 8}})
    assert v != study.gain_holdout(s, 2, {"data_gain": {"val_examples": 8}})
