"""passthrough: mergekit's slices / layer_range (layer stacking, depth up-scaling) on tiny random Llamas."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from taskvec.merge import MergeError, load_config, merge, to_mergekit

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
IDS = torch.tensor([[1, 5, 9, 33, 2, 70]])


def _llama(path, seed, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(LLAMA | over)))
    model.save_pretrained(path, max_shard_size="60KB")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    states = {n: _llama(root / n, seed) for n, seed in (("A", 0), ("B", 1), ("C", 2))}
    _llama(root / "wide", 3, hidden_size=48)
    return root, states


def _state(out):
    files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    d = {}
    for f in files:
        d.update(load_file(str(out / f)))
    return d


def _layer(state, i):
    """Layer i's tensors keyed by their name inside the layer."""
    p = f"model.layers.{i}."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def _src(root, name, a, b, **params):
    s = {"model": str(root / name), "layer_range": [a, b]}
    return {"sources": [s | ({"parameters": params} if params else {})]}


def _reference_logits(state, n_layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM(LlamaConfig(**(LLAMA | {"num_hidden_layers": n_layers})))
    ref.load_state_dict(state)
    return ref(IDS).logits


def _nothing_left(tmp_path, name="out"):
    return not (tmp_path / name).exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tmp")]


def test_two_models_stack_in_order_exactly_from_mergekit_yaml(models, tmp_path):
    from transformers import AutoModelForCausalLM

    root, st = models
    mk = {"merge_method": "passthrough", "dtype": "float32",
          "slices": [_src(root, "A", 0, 4), _src(root, "B", 2, 6)]}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk))
    res = merge(tmp_path / "mk.yaml", tmp_path / "out", show_progress=False, shard_size=50_000)
    out = tmp_path / "out"
    got = _state(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    expect_layers = [_layer(st["A"], i) for i in range(4)] + [_layer(st["B"], i) for i in range(2, 6)]
    assert sorted({int(k.split(".")[2]) for k in got if ".layers." in k}) == list(range(8))
    for j, src in enumerate(expect_layers):
        mine = _layer(got, j)
        assert mine.keys() == src.keys()
        for k in src:
            assert torch.equal(mine[k], src[k]), (j, k)
    # no base_model: mergekit's rule — embeddings from the first slice's model, final norm + LM head from the last's
    assert torch.equal(got["model.embed_tokens.weight"], st["A"]["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], st["B"]["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], st["B"]["lm_head.weight"])
    assert len(got) == 8 * len(_layer(st["A"], 0)) + 3
    assert res.tensors_merged == 8 * len(_layer(st["A"], 0)) and res.tensors_copied == 3
    assert [i["name"] for i in res.inputs] == ["A", "B"] and res.heads == []
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 8 and config["hidden_size"] == 32
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 8 and len(model.model.layers) == 8
    with torch.no_grad():
        logits = model(IDS).logits
        torch.testing.assert_close(logits, _reference_logits(got, 8))
    assert torch.isfinite(logits).all()
    rec = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert rec["method"] == "passthrough" and rec["slices"][1]["sources"][0]["layer_range"] == [2, 6]


def test_base_model_gives_the_non_layer_tensors_and_config(models, tmp_path):
    root, st = models
    cfg = {"method": "passthrough", "base_model": str(root / "C"),
           "slices": [_src(root, "A", 1, 3), _src(root, "B", 0, 1)]}
    merge(cfg, tmp_path / "out", show_progress=False)
    got = _state(tmp_path / "out")
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[k], st["C"][k]), k
    for j, (name, i) in enumerate((("A", 1), ("A", 2), ("B", 0))):
        src = _layer(st[name], i)
        assert all(torch.equal(_layer(got, j)[k], src[k]) for k in src)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    # mergekit would take the embeddings from A and the LM head from B: refused up front, nothing written
    with pytest.raises(MergeError, match="mergekit's passthrough takes the embeddings from the first slice"):
        merge(cfg, tmp_path / "mk", show_progress=False, write_mergekit=True)
    assert _nothing_left(tmp_path, "mk")


def test_depth_upscaling_with_overlapping_ranges_and_scale(models, tmp_path):
    """SOLAR-style: layers 0-3 and 2-5 of one model (8 layers, 2-3 twice); scale as mergekit applies it."""
    from transformers import AutoModelForCausalLM

    from taskvec.merge.config import evaluate

    root, st = models
    cfg = {"merge_method": "passthrough",
           "slices": [_src(root, "A", 0, 4),
                      _src(root, "A", 2, 6, scale=[{"filter": "o_proj", "value": 0.0},
                                                   {"filter": "down_proj", "value": [1.0, 0.0]}])]}
    merge(cfg, tmp_path / "out", show_progress=False)
    got = _state(tmp_path / "out")
    for j, i in enumerate([0, 1, 2, 3, 2, 3, 4, 5]):
        src, mine = _layer(st["A"], i), _layer(got, j)
        assert mine.keys() == src.keys()
        for k in src:
            if j >= 4 and "o_proj" in k:
                expect = torch.zeros_like(src[k])
            elif j >= 4 and "down_proj" in k:  # gradient over the 4 layers of the slice: t = 0, 1/3, 2/3, 1
                expect = src[k] * evaluate([1.0, 0.0], k, (j - 4) / 3)
            else:
                expect = src[k]
            assert torch.equal(mine[k], expect), (j, k)
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[k], st["A"][k])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert model.config.num_hidden_layers == 8
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, _reference_logits(got, 8))


def test_global_and_slice_scale_and_one_model_copy(models, tmp_path):
    root, st = models
    cfg = {"method": "passthrough", "parameters": {"scale": 2.0},
           "slices": [_src(root, "B", 0, 2) | {"parameters": {"scale": 0.5}}, _src(root, "B", 5, 6)]}
    merge(cfg, tmp_path / "s", show_progress=False, dtype="bfloat16")
    got = _state(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["dtype"] == "bfloat16"
    for j, (i, s) in enumerate(((0, 0.5), (1, 0.5), (5, 2.0))):
        src = _layer(st["B"], i)
        assert all(torch.equal(_layer(got, j)[k], (src[k] * s).bfloat16()) for k in src)
    # the global scale reaches the non-layer tensors too (mergekit evaluates them at t = 0)
    assert torch.equal(got["model.norm.weight"], (st["B"]["model.norm.weight"] * 2.0).bfloat16())
    # one model under `models`: a copy (mergekit's passthrough of one model)
    merge({"merge_method": "passthrough", "models": [{"model": str(root / "C")}]}, tmp_path / "c", show_progress=False)
    got = _state(tmp_path / "c")
    assert got.keys() == st["C"].keys() and all(torch.equal(got[k], st["C"][k]) for k in got)
    with pytest.raises(MergeError, match="base_model must be absent or that model"):
        load_config({"merge_method": "passthrough", "base_model": str(root / "A"), "models": [str(root / "C")]})


def test_mergekit_export_round_trips(models, tmp_path):
    root, st = models
    cfg = {"method": "passthrough", "slices": [_src(root, "A", 0, 3), _src(root, "B", 3, 6, scale=0.25)]}
    merge(cfg, tmp_path / "a", show_progress=False, write_mergekit=True)
    mk = yaml.safe_load((tmp_path / "a" / "mergekit.yaml").read_text())
    assert mk["merge_method"] == "passthrough" and "base_model" not in mk and "dtype" not in mk
    assert mk["slices"] == [{"sources": [{"model": str(root / "A"), "layer_range": [0, 3]}]},
                            {"sources": [{"model": str(root / "B"), "layer_range": [3, 6],
                                          "parameters": {"scale": 0.25}}]}]
    merge(tmp_path / "a" / "mergekit.yaml", tmp_path / "b", show_progress=False)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one = to_mergekit(load_config({"merge_method": "passthrough", "models": [str(root / "A")]}))
    assert one["models"] == [{"model": str(root / "A")}]


@pytest.mark.parametrize("case,match", [
    ("out_of_bounds", r"slices\[1\]\.sources\[0\]\.layer_range \[4, 7\] is out of bounds: .*B has 6 layers"),
    ("unknown_model", r"slices\[1\]\.sources\[0\]: unknown model .*no-such-model"),
    ("hidden_size", r"slices\[1\]\.sources\[0\]: .*wide has hidden size 48 but the output model .* has 32"),
    ("empty_range", r"slices\[0\]\.sources\[0\]\.layer_range \[3, 3\]: need 0 <= start < end"),
    ("not_ints", r"layer_range \[0, 2\.5\]: expected \[start, end\], two integers"),
    ("two_sources", r"slices\[0\]: passthrough takes exactly one source per slice, got 2"),
    ("other_method", r"'slices' are supported with merge_method passthrough only \(got 'ties'\)"),
    ("bad_scale", r"slices\[0\]\.sources\[0\]\.parameters\.scale = 'x': scale must be a finite number"),
    ("unknown_param", r"unknown parameter 'density' for method 'passthrough'"),
    ("no_slices", r"passthrough needs 'slices' \(layer ranges of models\) or exactly one model"),
    ("params_not_mapping", r"slices\[0\]\.parameters: expected a mapping of parameter names to values, got \[1\]"),
    ("vector", r"slices\[0\]\.sources\[0\]: .*tv\.safetensors is a task-vector file; passthrough stacks layers"),
])
def test_bad_slices_are_one_line_errors_leaving_nothing(models, tmp_path, case, match):
    root, _ = models
    good = [_src(root, "A", 0, 3), _src(root, "B", 2, 5)]
    cfg = {"merge_method": "passthrough", "slices": good}
    if case == "out_of_bounds":
        cfg["slices"] = [good[0], _src(root, "B", 4, 7)]
    elif case == "unknown_model":
        cfg["slices"] = [good[0], {"sources": [{"model": str(tmp_path / "no-such-model"), "layer_range": [0, 2]}]}]
    elif case == "hidden_size":
        cfg["slices"] = [good[0], _src(root, "wide", 0, 2)]
    elif case == "empty_range":
        cfg["slices"] = [_src(root, "A", 3, 3)]
    elif case == "not_ints":
        cfg["slices"] = [{"sources": [{"model": str(root / "A"), "layer_range": [0, 2.5]}]}]
    elif case == "two_sources":
        cfg["slices"] = [{"sources": good[0]["sources"] + good[1]["sources"]}]
    elif case == "other_method":
        cfg["merge_method"] = "ties"
    elif case == "bad_scale":
        cfg["slices"] = [_src(root, "A", 0, 2, scale="x")]
    elif case == "unknown_param":
        cfg["parameters"] = {"density": 0.5}
    elif case == "no_slices":
        cfg.pop("slices")
    elif case == "params_not_mapping":
        cfg["slices"] = [good[0] | {"parameters": [1]}]
    elif case == "vector":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(tmp_path / "tv.safetensors"), metadata={"format": "taskvec.task_vector"})
        cfg["slices"] = [{"sources": [{"model": str(tmp_path / "tv.safetensors"), "layer_range": [0, 1]}]}]
    with pytest.raises(MergeError, match=match) as e:
        merge(cfg, tmp_path / "out", show_progress=False)
    assert "\n" not in str(e.value)
    assert _nothing_left(tmp_path)


def test_layer_names_must_line_up(models, tmp_path):
    """A source whose layers lack a tensor of the output model's layers is refused, naming it."""
    from safetensors.torch import save_file

    root, st = models
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((root / "A" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in st["A"].items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(odd / "model.safetensors"))
    cfg = {"merge_method": "passthrough", "slices": [_src(root, "A", 0, 2), {"sources": [
        {"model": str(odd), "layer_range": [0, 2]}]}]}
    with pytest.raises(MergeError, match=r"layer 1 of .*odd does not match .*model\.layers\.N\.mlp\.up_proj\.weight"):
        merge(cfg, tmp_path / "out", show_progress=False)
    assert _nothing_left(tmp_path)


def test_model_card_of_a_passthrough_merge(models, tmp_path):
    root, _ = models
    cfg = {"merge_method": "passthrough", "slices": [_src(root, "A", 0, 4), _src(root, "B", 2, 6)]}
    merge(cfg, tmp_path / "out", show_progress=False, card_extra="## Measured\n\nnothing yet")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 0–3 | `" + str(root / "A") + "` | 0–3 |" in card
    assert "| 4–7 | `" + str(root / "B") + "` | 2–5 |" in card
    assert "8 layers in all" in card and "embeddings from the first slice's model" in card
    assert f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})" in card
    assert card.rstrip().endswith("## Measured\n\nnothing yet")


def test_backbone_save_lines_up_with_a_causal_lm_base(models, tmp_path):
    """A LlamaModel save (``layers.0…``) as a source in a LlamaForCausalLM output (``model.layers.0…``)."""
    from safetensors.torch import save_file

    root, st = models
    bb = tmp_path / "bb"
    bb.mkdir()
    cfg = json.loads((root / "B" / "config.json").read_text()) | {"architectures": ["LlamaModel"]}
    (bb / "config.json").write_text(json.dumps(cfg))
    save_file({k[len("model."):]: v.contiguous() for k, v in st["B"].items() if k.startswith("model.")},
              str(bb / "model.safetensors"))
    merge({"merge_method": "passthrough", "base_model": str(root / "A"),
           "slices": [_src(root, "A", 0, 1), {"sources": [{"model": str(bb), "layer_range": [3, 5]}]}]},
          tmp_path / "out", show_progress=False)
    got = _state(tmp_path / "out")
    for j, (name, i) in enumerate((("A", 0), ("B", 3), ("B", 4))):
        src = _layer(st[name], i)
        assert _layer(got, j).keys() == src.keys() and all(torch.equal(_layer(got, j)[k], src[k]) for k in src)
    assert torch.equal(got["lm_head.weight"], st["A"]["lm_head.weight"])
