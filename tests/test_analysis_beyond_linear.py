"""analysis/beyond_linear.py on a tiny run: every predictor is scored from the cached tensors, the cached
measurements are the model's own, and the hybrid keeps the trusted Taylor predictions as they are."""

import json

import pytest
import torch
from conftest import load_script


def _module():
    return load_script("beyond_linear")


def test_beyond_linear_on_a_tiny_run(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from taskvec.linearize import accuracy, forward_outputs
    from taskvec.runs import Run

    mod = _module()
    cache = tmp_path / "cache.safetensors"
    mod.main(["--run", str(tiny_run), "--config", "none", "--n-eval", "16", "--probe-sizes", "4,16", "--seeds", "2",
              "--cache", str(cache), "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "beyond_linear_run.json").read_text())
    T, meta = load_file(cache), data["meta"]
    assert meta["merges"][:2] == ["ties d=0.2", "tsv"] and "task_arithmetic λ=0.1" in meta["merges"]
    run = Run.open(tiny_run, require="vectors")
    t = meta["tasks"][0]
    f, y = forward_outputs(run.base_task_model(t), run.eval_batches(t, 16))
    assert torch.equal(T[f"labels/{t}"], y) and torch.allclose(T[f"f0/{t}"], f, atol=1e-5)
    scores = data["scores"]
    assert {"taylor1", "taylor2", "gated", "pade", "probe1/2 k=4", "hybrid k=16"} <= set(scores)
    # a probe of every example is a measurement: no error, whatever the expansion
    assert scores["probe0 k=16"]["mae"] == pytest.approx(0.0, abs=1e-9)
    for r in data["rows"]:
        if r["taylor_trusted"]:  # the hybrid keeps a trusted Taylor prediction as it is
            assert r["hybrid"] == r["taylor2"]
        assert 0 <= r["measured"] <= 1 and r["base"] == pytest.approx(accuracy(T[f"f0/{r['task']}"],
                                                                                 T[f"labels/{r['task']}"]))
    text = (tmp_path / "beyond_linear_run.md").read_text()
    assert f"{scores['taylor2']['spearman']:.3f}" in text
    # a second call re-scores the cache without touching the run
    mod.main(["--run", str(tiny_run), "--probe-sizes", "4", "--seeds", "1", "--cache", str(cache),
              "--results-dir", str(tmp_path)])
