"""Streaming engine: exactness vs in-memory merges, loadable output, heads, runs, configs, every error."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from taskvec.errors import OutputExistsError, ShapeMismatchError
from taskvec.merge import MergeError, get_method, load_config, merge

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)


def _llama(path, seed=0, base_state=None, scale=0.02, vocab=96, shard="40KB"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(LLAMA | {"vocab_size": vocab})))
    if base_state is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base_state[n] + scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(path, max_shard_size=shard)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    base = _llama(root / "base")
    fts = [_llama(root / f"ft{i}", seed=i + 1, base_state=base) for i in range(3)]
    return root, base, fts


def _state(out):
    d = {}
    with open(out / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    for f in files:
        d.update(load_file(str(out / f)))
    return d


def _cfg(root, method, params=None, models_params=None, n=3):
    return {"method": method, "base_model": str(root / "base"),
            "models": [{"model": str(root / f"ft{i}"), "parameters": (models_params or [{}] * n)[i]}
                       for i in range(n)], "parameters": params or {}}


def test_task_arithmetic_through_engine_is_exact_and_sharded(llamas, tmp_path):
    root, base, fts = llamas
    lam = 0.7
    res = merge(_cfg(root, "task_arithmetic", {"lambda": lam}), tmp_path / "out", shard_size=60_000,
                show_progress=False)
    out = tmp_path / "out"
    assert len(list(out.glob("model-*.safetensors"))) > 1 and res.tensors_merged == len(base)
    got = _state(out)
    for k, b in base.items():
        expect = b + ((fts[0][k] - b) + (fts[1][k] - b) + (fts[2][k] - b)) * lam  # θ0 + λ·Σ τ
        assert torch.equal(got[k], expect), k
    assert (out / "config.json").is_file() and (out / "merge_config.yaml").is_file()
    rec = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert rec["method"] == "task_arithmetic" and len(rec["inputs"]) == 3


@pytest.mark.parametrize("method,params,mparams", [
    ("ties", {"lambda": 0.9}, [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6},
                               {"weight": 2.0, "density": 1.0}]),
    ("dare_ties", {"seed": 5}, [{"density": 0.5}] * 3),
    ("breadcrumbs", {}, [{"density": 0.8, "gamma": 0.05}] * 3),
    ("tsv", {}, None),
    ("iso_c", {"lambda": 1.2}, None),
    ("linear", {}, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}]),
])
@pytest.mark.parametrize("small_chunks", [False, True])
def test_streaming_equals_in_memory(llamas, tmp_path, monkeypatch, method, params, mparams, small_chunks):
    from taskvec.merge import methods as mm
    from taskvec.merge.params import layer_position, tensor_seed

    if small_chunks:  # many chunks per tensor, and the sampled threshold bracket, on tiny tensors
        monkeypatch.setattr(mm, "CHUNK", 100)
        monkeypatch.setattr(mm, "SAMPLE_MIN_N", 500)
        monkeypatch.setattr(mm, "SAMPLE_SIZE", 256)
    root, base, fts = llamas
    merge(_cfg(root, method, params, mparams), tmp_path / "out", show_progress=False)
    monkeypatch.undo()  # the reference: whole tensors, no sampling
    got = _state(tmp_path / "out")
    m = get_method(method)
    mparams = mparams or [{}] * 3
    for k, b in base.items():
        per = {p.name: [mp.get(p.name, p.default) for mp in mparams] for p in m.params if p.per_model}
        glob = {p.name: params.get(p.name, p.default) for p in m.params if not p.per_model}
        if m.random:
            glob["seed"] = tensor_seed(params.get("seed", 0), k)
        w = per.pop("weight")
        delta = m(b, [f[k] - b for f in fts], w, **per, **glob)
        torch.testing.assert_close(got[k], b + delta, rtol=0, atol=0, msg=k)
    assert layer_position("model.layers.1.mlp.up_proj.weight", 2) == 1.0


def test_merged_dir_loads_with_transformers_and_gives_expected_logits(llamas, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root, base, fts = llamas
    merge(_cfg(root, "ties", {}, [{"density": 0.5}] * 3), tmp_path / "out", show_progress=False,
          dtype="bfloat16")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    m = get_method("ties")
    ref = LlamaForCausalLM(LlamaConfig(**LLAMA))
    state = {k: (b + m(b, [f[k] - b for f in fts], [1.0] * 3, density=[0.5] * 3)).bfloat16().float()
             for k, b in base.items()}
    ref.load_state_dict(state)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    torch.testing.assert_close(loaded(ids).logits, ref(ids).logits)


def test_filters_apply_per_tensor(llamas, tmp_path):
    root, base, fts = llamas
    params = {"weight": [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]}
    merge(_cfg(root, "task_arithmetic", params), tmp_path / "out", show_progress=False)
    got = _state(tmp_path / "out")
    k_attn, k_mlp = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[k_attn], base[k_attn])
    assert not torch.equal(got[k_mlp], base[k_mlp])


def test_mergekit_yaml_round_trip(llamas, tmp_path):
    root, base, fts = llamas
    mk = {"merge_method": "ties", "base_model": str(root / "base"), "dtype": "float32",
          "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.5}}
                     for i in range(3)],
          "parameters": {"normalize": True, "lambda": 1.0, "int8_mask": True}}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk))
    merge(tmp_path / "mk.yaml", tmp_path / "a", show_progress=False, write_mergekit=True)
    written = yaml.safe_load((tmp_path / "a" / "mergekit.yaml").read_text())
    assert written["merge_method"] == "ties" and written["models"][0]["parameters"]["density"] == 0.5
    merge(tmp_path / "a" / "mergekit.yaml", tmp_path / "b", show_progress=False)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MergeError, match="mergekit has no method 'tsv'"):
        merge(_cfg(root, "tsv"), tmp_path / "c", show_progress=False, write_mergekit=True)
    assert not (tmp_path / "c").exists()


# --- BERT: heads, prefixes, task vectors, runs ------------------------------------------------------


BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=120,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("berts")
    torch.manual_seed(0)
    base = BertModel(BertConfig(**BERT))
    base.save_pretrained(root / "base")
    (root / "base" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(120)))
    fts = []
    for i, labels in enumerate((2, 3)):
        torch.manual_seed(10 + i)
        m = BertForSequenceClassification(BertConfig(**BERT, num_labels=labels))
        with torch.no_grad():
            for n, p in m.bert.named_parameters():
                p.copy_(dict(base.named_parameters())[n] + 0.01 * torch.randn_like(p))
        m.save_pretrained(root / f"ft{i}")
        fts.append(m)
    return root, base, fts


def test_prefixed_classification_checkpoints_merge_into_backbone_with_heads(berts, tmp_path):
    from transformers import AutoModel

    root, base, fts = berts
    cfg = {"method": "task_arithmetic", "base_model": str(root / "base"),
           "models": [{"model": str(root / "ft0"), "name": "sst"}, {"model": str(root / "ft1"), "name": "trec"}]}
    res = merge(cfg, tmp_path / "out", show_progress=False)
    assert sorted(res.heads) == ["sst", "trec"]
    heads = load_file(str(tmp_path / "out" / "heads" / "trec" / "head.safetensors"))
    assert heads["classifier.weight"].shape == (3, 32)
    torch.testing.assert_close(heads["classifier.weight"], fts[1].classifier.weight.detach())
    merged = AutoModel.from_pretrained(tmp_path / "out")
    bp = dict(base.named_parameters())
    for n, p in merged.named_parameters():
        f0, f1 = dict(fts[0].bert.named_parameters())[n], dict(fts[1].bert.named_parameters())[n]
        torch.testing.assert_close(p, bp[n] + ((f0 - bp[n]) + (f1 - bp[n])), rtol=0, atol=1e-7)
    assert (tmp_path / "out" / "vocab.txt").is_file()


def _vector(path, state, names, base_fp="x"):
    meta = {"format": "taskvec.task_vector", "version": "1", "base_fingerprint": base_fp, "base_model": "b",
            "scope": "qkv", "task": path.stem, "dtype": "float16"}
    save_file({n: state[n].half().contiguous() for n in names}, str(path), metadata=meta)


def test_task_vector_files_and_runs(berts, tmp_path):
    root, base, fts = berts
    qkv = [n for n, _ in base.named_parameters() if "attention.self" in n and n.endswith("weight")]
    g = torch.Generator().manual_seed(0)
    taus = [{n: 0.01 * torch.randn(p.shape, generator=g) for n, p in base.named_parameters()} for _ in range(2)]
    run = tmp_path / "RUN"
    (run / "vectors").mkdir(parents=True)
    for t, task in enumerate(("a", "b")):
        _vector(run / "vectors" / f"{task}.safetensors", taus[t], qkv)
        hd = run / "finetune" / task
        hd.mkdir(parents=True)
        save_file({"linear.weight": torch.randn(2 + t, 32)}, str(hd / "head.safetensors"))
        (hd / "head.json").write_text(json.dumps({"kind": "linear", "task": task}))
    (run / "run.json").write_text(json.dumps({"base_model": str(root / "base"), "scope": "qkv", "tasks": ["a", "b"]}))
    res = merge({"run": str(run), "method": "task_arithmetic", "parameters": {"lambda": 0.5}}, tmp_path / "out",
                show_progress=False)
    assert sorted(res.heads) == ["a", "b"]
    assert json.loads((tmp_path / "out" / "heads" / "b" / "head.json").read_text())["task"] == "b"
    got = _state(tmp_path / "out")
    bp = dict(base.named_parameters())
    for n, p in bp.items():
        if n in qkv:
            expect = p + (taus[0][n].half().float() + taus[1][n].half().float()) * 0.5
        else:
            expect = p
        torch.testing.assert_close(got[n], expect.detach(), rtol=0, atol=0)
    with pytest.raises(MergeError, match="task 'c' is not in run"):
        load_config({"run": str(run), "method": "ties", "tasks": ["a", "c"]})


# --- errors -----------------------------------------------------------------------------------------------


def test_errors_shape_vocab_nan_shards_header(llamas, berts, tmp_path):
    root, base, fts = llamas
    # shape mismatch: name the tensor and both shapes
    bad = tmp_path / "bad"
    bad.mkdir()
    st = dict(load_file(str(next((root / "ft0").glob("*.safetensors")))))
    k = next(n for n in st if "q_proj" in n)
    full = _state_dir(root / "ft0")
    full[k] = torch.zeros(16, 32)
    _save_dir(bad, full, root / "ft0")
    with pytest.raises(ShapeMismatchError, match=rf"{k}.*\(32, 32\).*\(16, 32\)"):
        merge(_cfg(root, "ties") | {"models": [{"model": str(bad)}]}, tmp_path / "o", show_progress=False)
    # NaN: name the file and the tensor
    full = _state_dir(root / "ft0")
    full[k][0, 0] = float("nan")
    nan_dir = tmp_path / "nan"
    _save_dir(nan_dir, full, root / "ft0")
    with pytest.raises(MergeError, match=rf"{k}.*{nan_dir}.*NaN or Inf"):
        merge(_cfg(root, "task_arithmetic") | {"models": [{"model": str(nan_dir)}]}, tmp_path / "o",
              show_progress=False)
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]
    # different vocab sizes
    _llama(tmp_path / "v", vocab=100)
    with pytest.raises(MergeError, match="different vocabulary sizes.*96.*100"):
        merge(_cfg(root, "ties") | {"models": [{"model": str(tmp_path / "v")}]}, tmp_path / "o", show_progress=False)
    # missing shard
    import shutil

    miss = tmp_path / "miss"
    shutil.copytree(root / "ft1", miss)
    victim = sorted(miss.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(MergeError, match=f"missing shard {victim.name}"):
        merge(_cfg(root, "ties") | {"models": [{"model": str(miss)}]}, tmp_path / "o", show_progress=False)
    # corrupted header
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "ft1", corrupt)
    f = sorted(corrupt.glob("model-*.safetensors"))[0]
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))
    with pytest.raises(MergeError, match=f"cannot read safetensors file .*{f.name}"):
        merge(_cfg(root, "ties") | {"models": [{"model": str(corrupt)}]}, tmp_path / "o", show_progress=False)
    # names that differ
    full = _state_dir(root / "ft0")
    full["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    odd = tmp_path / "odd"
    _save_dir(odd, full, root / "ft0")
    with pytest.raises(MergeError, match="model.layers.0.mlp.extra.weight.*names differ"):
        merge(_cfg(root, "ties") | {"models": [{"model": str(odd)}]}, tmp_path / "o", show_progress=False)


def test_errors_config_and_output(llamas, berts, tmp_path):
    root, base, fts = llamas
    with pytest.raises(MergeError, match="unknown merge method 'soup'; valid: linear"):
        merge(_cfg(root, "soup"), tmp_path / "o", show_progress=False)
    with pytest.raises(MergeError, match="unknown parameter 'alpha'.*valid: weight, normalize, lambda"):
        merge(_cfg(root, "task_arithmetic", {"alpha": 1}), tmp_path / "o", show_progress=False)
    with pytest.raises(MergeError, match=r"density = 0: density must be in \(0, 1\]"):
        merge(_cfg(root, "ties", {"density": 0}), tmp_path / "o", show_progress=False)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="exists"):
        merge(_cfg(root, "ties"), tmp_path / "exists", show_progress=False)
    assert (tmp_path / "exists" / "keep.txt").is_file()
    merge(_cfg(root, "ties"), tmp_path / "exists", overwrite=True, show_progress=False)
    assert not (tmp_path / "exists" / "keep.txt").exists()
    # different tokenizers (same size): refused unless allowed
    broot, *_ = berts
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(broot / "ft0", tok)
    (tok / "vocab.txt").write_text("\n".join(f"other{i}" for i in range(120)))
    cfg = {"method": "ties", "base_model": str(broot / "base"), "models": [str(tok)]}
    with pytest.raises(MergeError, match="different tokenizers"):
        merge(cfg, tmp_path / "t", show_progress=False)
    merge(cfg | {"allow_different_tokenizers": True}, tmp_path / "t", show_progress=False)


def test_interrupted_merge_leaves_nothing(llamas, tmp_path, monkeypatch):
    from taskvec.merge import methods

    root, *_ = llamas
    calls = {"n": 0}
    orig = methods.METHODS["task_arithmetic"].fn

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setitem(methods.METHODS, "task_arithmetic",
                        methods.Method("task_arithmetic", boom, methods.METHODS["task_arithmetic"].params, ""))
    with pytest.raises(KeyboardInterrupt):
        merge(_cfg(root, "task_arithmetic"), tmp_path / "out", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def _state_dir(d):
    out = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def _save_dir(dest, state, like):
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(like / "config.json", dest / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"))


def test_taskvec_merge_is_callable_and_a_package():
    import taskvec
    import taskvec.merge as pkg
    from taskvec.merge import merge

    assert taskvec.merge is pkg and callable(taskvec.merge) and callable(merge)
    with pytest.raises(pkg.MergeError, match="not found"):
        taskvec.merge("no-such-config.yaml", "out-never-written")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,params,mparams", [
    ("task_arithmetic", {"lambda": 0.7}, None),
    ("ties", {}, [{"density": 0.4}] * 3),
    ("dare_ties", {"seed": 3}, [{"density": 0.5}] * 3),
    ("tsv", {}, None),
])
def test_cuda_merge_equals_cpu(llamas, tmp_path, method, params, mparams):
    from taskvec.merge import merge

    root = llamas[0]
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    merge(_cfg(root, method, params, mparams), cpu, show_progress=False)
    merge(_cfg(root, method, params, mparams), gpu, device="cuda", show_progress=False)
    a, b = _state(cpu), _state(gpu)
    assert a.keys() == b.keys()
    # SVD-based methods run cuSOLVER on the GPU: float32 agreement, not identity
    tol = 1e-4 if method == "tsv" else 1e-6
    for k in a:
        err = float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
        assert err <= tol, (k, err)


def test_merge_result_repr_is_a_summary(llamas, tmp_path):
    root, base, _ = llamas
    res = merge(_cfg(root, "ties", {"density": 0.5}), tmp_path / "out", show_progress=False)
    text = repr(res)
    assert text.startswith("MergeResult(ties of 3 inputs [") and f"{len(base)} tensors merged" in text
    assert "tensor(" not in text and len(text) < 400
    assert "<table>" in res._repr_html_() and res._repr_html_().count("<tr>") == 4


# --- model card, task heads, required parameters ------------------------------------------------------------


def test_model_card_records_base_inputs_method_version_and_loading(llamas, tmp_path):
    import re

    import taskvec

    root, base, fts = llamas
    cfg = _cfg(root, "ties", {"lambda": 0.9}, [{"density": 0.3}, {"density": 0.6}, {"density": 1.0}])
    merge(cfg, tmp_path / "out", show_progress=False, card_extra="## Validation\n\n| task | measured |\n|---|---|")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"`{root / 'base'}` (θ0" in card
    for i in range(3):
        assert f"| ft{i} | model | `{root / f'ft{i}'}` |" in card
    rec = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert rec == yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert rec["method"] == "ties" and rec["parameters"] == {"lambda": 0.9}
    assert [m["parameters"]["density"] for m in rec["models"]] == [0.3, 0.6, 1.0]
    assert f"taskvec {taskvec.__version__} on " in card and re.search(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", card)
    assert f"AutoModel.from_pretrained({str(tmp_path / 'out')!r})" in card
    assert "load_task_model" not in card  # no heads
    assert card.rstrip().endswith("## Validation\n\n| task | measured |\n|---|---|")
    assert not (tmp_path / "b").exists()
    merge(cfg, tmp_path / "b", show_progress=False)  # no extra: the card ends with the loading section
    assert (tmp_path / "b" / "README.md").read_text().rstrip().endswith("```")


def test_run_heads_load_on_the_merged_backbone_as_the_card_says(berts, tmp_path):
    from dataclasses import asdict

    from transformers import AutoModel

    import taskvec
    from taskvec.modeling import HeadSpec, LinearHead

    root, base, _ = berts
    run = tmp_path / "RUN"
    (run / "vectors").mkdir(parents=True)
    names = [n for n, _ in base.named_parameters() if "attention.self" in n]
    g = torch.Generator().manual_seed(3)
    heads = {}
    for task, labels in (("a", 2), ("b", 3)):
        _vector(run / "vectors" / f"{task}.safetensors",
                {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in base.named_parameters()}, names)
        torch.manual_seed(labels)
        heads[task] = LinearHead(32, labels)
        hd = run / "finetune" / task
        hd.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in heads[task].state_dict().items()}, str(hd / "head.safetensors"))
        spec = HeadSpec(kind="linear", pooling="mean", num_labels=labels, task=task)
        (hd / "head.json").write_text(json.dumps(asdict(spec)))
    (run / "run.json").write_text(json.dumps({"base_model": str(root / "base"), "scope": "qkv", "tasks": ["a", "b"]}))
    out = tmp_path / "out"
    merge({"run": str(run), "method": "task_arithmetic"}, out, show_progress=False)
    card = (out / "README.md").read_text()
    call = f"taskvec.load_task_model({str(out / 'heads' / 'a')!r}, backbone={str(out)!r})"
    assert call in card and "`a`, `b`" in card
    tm = eval(call, {"taskvec": taskvec})  # the card's own line
    ids, mask = torch.tensor([[2, 7, 11, 5]]), torch.ones(1, 4, dtype=torch.long)
    backbone = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        feats = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
        torch.testing.assert_close(tm.eval()(ids, mask), heads["a"](feats))
    assert taskvec.load_task_model(out / "heads" / "b", backbone=out)(ids, mask).shape == (1, 3)


def test_checkpoint_heads_are_described_as_raw_tensors_in_the_card(berts, tmp_path):
    root, _, _ = berts
    cfg = {"method": "task_arithmetic", "base_model": str(root / "base"), "models": [str(root / "ft0")]}
    merge(cfg, tmp_path / "out", show_progress=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "heads/{ft0}/head.safetensors" in card and "not taskvec task heads" in card
    assert "taskvec.load_task_model(" not in card


@pytest.mark.parametrize("method", ["slerp", "nearswap"])
def test_required_parameters_are_enforced_before_any_output(llamas, tmp_path, method):
    root, _, _ = llamas
    cfg = {"method": method, "base_model": str(root / "base"), "models": [{"model": str(root / "ft0")}]}
    with pytest.raises(MergeError, match=rf"^method '{method}' requires parameter 't' \(.*\); set parameters\.t$"):
        merge(cfg, tmp_path / "out", show_progress=False)
    with pytest.raises(MergeError, match="requires parameter 't'"):
        load_config(cfg)
    # filter rules that leave a tensor without a value: refused when the names are known, before writing
    cfg["parameters"] = {"t": [{"filter": "self_attn", "value": 0.3}]}
    with pytest.raises(MergeError, match=r"requires parameter 't', but no filter rule of it matches tensor"):
        merge(cfg, tmp_path / "out", show_progress=False)
    assert list(tmp_path.iterdir()) == []
    cfg["parameters"] = {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.01}]}
    merge(cfg, tmp_path / "out", show_progress=False)


def test_lora_output_card_loads_with_peft(llamas, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root, base, _ = llamas
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    model.load_state_dict(base)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.fill_(0.01)
    model.save_pretrained(tmp_path / "ad")
    cfg = {"method": "task_arithmetic", "base_model": str(root / "base"), "lora_rank": 2,
           "models": [str(tmp_path / "ad")]}
    merge(cfg, tmp_path / "out", show_progress=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: peft" in card
    code = card.split("## How to load it\n\n```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(code, scope)
    assert isinstance(scope["model"], PeftModel)
