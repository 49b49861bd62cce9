"""The merge methods against mergekit 0.1.5 itself: the same YAML through ``mergekit-yaml`` and
``taskvec.merge`` on tiny Llama checkpoints, tensor by tensor (slow; needs mergekit installed in a separate
virtualenv, as benchmarks/merge.py uses: set TASKVEC_MERGEKIT to its mergekit-yaml).

Deterministic methods must agree to float32 round-off (the share of bit-identical tensors is reported by
benchmarks/merge.py on a 0.5B model); DELLA draws its masks from a different generator, so it is compared by
the statistics of what it keeps: the share of entries moved and the RMS of the merged Δ.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from taskvec.merge import merge

from conftest import llama_family

MERGEKIT = Path(os.environ.get("TASKVEC_MERGEKIT", "/tmp/mk-venv/bin/mergekit-yaml"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit 0.1.5 not installed (set TASKVEC_MERGEKIT)")]

LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vs_mergekit")
    llama_family(root, LLAMA)
    return root


def _state(d: Path) -> dict:
    out = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def _both(cfg: dict, tmp_path: Path) -> tuple[dict, dict]:
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([str(MERGEKIT), str(tmp_path / "m.yaml"), str(tmp_path / "mk"), "--no-copy-tokenizer"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    merge(tmp_path / "m.yaml", tmp_path / "tv", show_progress=False)
    return _state(tmp_path / "tv"), _state(tmp_path / "mk")


def _models(root, idx, params=None):
    return [{"model": str(root / ("base" if i == "base" else f"ft{i}")), **({"parameters": params[j]} if params else {})}
            for j, i in enumerate(idx)]


CASES = {  # name: (method, models, per-model parameters, global parameters)
    "task_arithmetic": ("task_arithmetic", [0, 1, 2], [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.8}], {}),
    "ties": ("ties", [0, 1, 2], [{"weight": 1.0, "density": 0.4}] * 3, {"normalize": True}),
    "slerp": ("slerp", ["base", 0], None, {"t": 0.4}),
    "slerp-gradient": ("slerp", ["base", 1], None, {"t": [0.0, 0.3, 1.0]}),
    "nuslerp": ("nuslerp", [0, 1], [{"weight": 1.0}, {"weight": 2.0}], {}),
    "nuslerp-rows": ("nuslerp", [0, 1], [{"weight": 1.0}, {"weight": 3.0}], {"nuslerp_flatten": False}),
    "multislerp": ("multislerp", [0, 1, 2], [{"weight": 0.5}, {"weight": 1.0}, {"weight": 1.5}], {}),
    "karcher": ("karcher", [0, 1, 2], None, {"max_iter": 20}),
    "model_stock": ("model_stock", [0, 1, 2], None, {}),
    "model_stock-filter_wise": ("model_stock", [0, 1, 2], None, {"filter_wise": True}),
    "sce": ("sce", [0, 1, 2], None, {"select_topk": 0.5}),
    "nearswap": ("nearswap", [2], None, {"t": 0.01}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_methods_equal_mergekit(models, tmp_path, case):
    method, idx, per, glob = CASES[case]
    cfg = {"merge_method": method, "base_model": str(models / "base"), "dtype": "float32",
           "models": _models(models, idx, per), **({"parameters": glob} if glob else {})}
    tv, mk = _both(cfg, tmp_path)
    assert set(tv) == set(mk)
    for k in tv:
        torch.testing.assert_close(tv[k], mk[k], rtol=1e-5, atol=1e-6, msg=f"{case}: {k}")


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_keeps_what_mergekit_keeps_by_statistics(models, tmp_path, method):
    per = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 3
    cfg = {"merge_method": method, "base_model": str(models / "base"), "dtype": "float32",
           "models": _models(models, [0, 1, 2], per), "parameters": {"lambda": 1.0}}
    tv, mk = _both(cfg, tmp_path)
    base = _state(models / "base")
    for k in [k for k in base if k.endswith(("q_proj.weight", "down_proj.weight", "gate_proj.weight"))]:
        dt, dm = (tv[k] - base[k]).double(), (mk[k] - base[k]).double()
        moved_t, moved_m = float((dt != 0).double().mean()), float((dm != 0).double().mean())
        assert abs(moved_t - moved_m) < 0.02, (k, moved_t, moved_m)
        rms_t, rms_m = float(dt.pow(2).mean().sqrt()), float(dm.pow(2).mean().sqrt())
        assert abs(rms_t - rms_m) <= 0.05 * rms_m, (k, rms_t, rms_m)


def test_passthrough_slices_equal_mergekit(models, tmp_path):
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(models / "base"), "layer_range": [0, 3]}]},
                      {"sources": [{"model": str(models / "ft0"), "layer_range": [1, 4]}]}]}
    tv, mk = _both(cfg, tmp_path)
    assert set(tv) == set(mk)
    for k in tv:
        assert torch.equal(tv[k], mk[k]), k
    cfg_tv = json.loads((tmp_path / "tv" / "config.json").read_text())
    assert cfg_tv["num_hidden_layers"] == json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"] == 6
