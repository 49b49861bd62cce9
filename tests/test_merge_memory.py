"""In-memory merges (taskvec.merge.memory) equal the streaming engine's merges written to disk."""

import json

import pytest
import torch
from safetensors.torch import load_file

from taskvec.merge import MergeError, MergeSpec, merge, merge_vectors
from taskvec.task_vector import TaskVector

from conftest import llama_family

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem_llamas")
    base, fts = llama_family(root, LLAMA)
    return root, base, fts


def _disk_delta(out, base):
    files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    got = {}
    for f in files:
        got.update(load_file(str(out / f)))
    return {k: got[k] - base[k] for k in base}


@pytest.mark.parametrize("method,params,per_model", [
    ("task_arithmetic", {"lambda": 0.7}, None),
    ("ties", {"density": 0.3}, None),
    ("dare_linear", {"density": 0.5, "seed": 3}, None),  # random: per-tensor seeds must agree
    ("linear", {}, {"weight": [0.2, 0.3, 0.5]}),
    ("task_arithmetic", {"lambda": [0.2, 1.0]}, None),  # a gradient over layers
])
def test_in_memory_equals_engine(llamas, tmp_path, method, params, per_model):
    root, base, fts = llamas
    vectors = [TaskVector({k: f[k] - base[k] for k in base if base[k].is_floating_point()}) for f in fts]
    models = [{"model": str(root / f"ft{i}"),
               "parameters": {k: v[i] for k, v in (per_model or {}).items()}} for i in range(3)]
    merge({"method": method, "base_model": str(root / "base"), "models": models, "parameters": params},
          tmp_path / "out", show_progress=False)
    disk = _disk_delta(tmp_path / "out", base)
    mem = merge_vectors(vectors, method, base, **params, **(per_model or {}))
    assert set(mem) <= set(disk) and mem
    for k, d in mem.items():
        # disk holds θ0 + Δ rounded to float32, so compare Δ within that rounding (not bitwise)
        torch.testing.assert_close(d, disk[k], rtol=0, atol=1e-6 * (1 + float(base[k].abs().max())), msg=k)
    if method == "task_arithmetic" and isinstance(params["lambda"], list):  # the gradient really varies
        k0 = "model.layers.0.self_attn.q_proj.weight"
        k2 = "model.layers.2.self_attn.q_proj.weight"
        s = sum(v.deltas[k0] for v in vectors)
        torch.testing.assert_close(mem[k0], 0.2 * s)
        torch.testing.assert_close(mem[k2], 1.0 * sum(v.deltas[k2] for v in vectors))


def test_in_memory_errors(llamas):
    _, base, fts = llamas
    vectors = [TaskVector({"model.norm.weight": f["model.norm.weight"] - base["model.norm.weight"]}) for f in fts]
    with pytest.raises(MergeError, match="unknown parameters.*'densty'"):
        merge_vectors(vectors, "ties", base, densty=0.2)
    with pytest.raises(MergeError, match="'weight' has 2 values for 3 task vectors"):
        merge_vectors(vectors, "linear", base, weight=[0.5, 0.5])
    with pytest.raises(MergeError, match="'nope.weight'.*not in the base"):
        merge_vectors([TaskVector({"nope.weight": torch.zeros(2)})], "task_arithmetic", base)
    assert MergeSpec("a", "ties").params == {}
