"""Studies of checkpoints made without taskvec: HF sequence classifiers and a peft adapter, end to end."""

import json

import pytest
import torch
import yaml
from conftest import minilm_tokenizer_dir, toy_task

from taskvec.cli import main
from taskvec.study import StudyError, load_study, prepare_study

BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


def _write_csv(task, path, label_names=None):
    names = label_names or task.label_names
    path.write_text("sentence,label\n" + "".join(f'"{x}",{names[y]}\n' for x, y in zip(task.texts, task.labels)))
    return path


def _train(model, tok, task, steps=12, lr=3e-3, seed=0):
    """A plain torch loop (no taskvec): a few AdamW steps on the whole toy task."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        idx = [(i * 16 + j) % len(task) for j in range(16)]
        enc = tok([task.texts[k] for k in idx], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([task.labels[k] for k in idx])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A base BERT, two full fine-tunes saved by save_pretrained, and a peft LoRA adapter with its head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("ckpts")
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    torch.manual_seed(0)
    base = BertModel(BertConfig(**BERT))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = {"alpha": toy_task("alpha", n=160, seed=0), "beta": toy_task("beta", n=160, seed=1),
             "gamma": toy_task("gamma", n=160, seed=2)}
    for i, name in enumerate(("alpha", "beta")):
        cfg = BertConfig(**BERT, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        m = BertForSequenceClassification(cfg)
        m.bert.load_state_dict(base.state_dict())
        _train(m, tok, tasks[name], seed=i).save_pretrained(root / name)
    cfg = BertConfig(**BERT, num_labels=2)
    m = BertForSequenceClassification(cfg)
    m.bert.load_state_dict(base.state_dict())
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                      modules_to_save=["classifier"]))
    _train(pm, tok, tasks["gamma"], seed=2)
    pm.save_pretrained(root / "gamma")
    data = {n: _write_csv(t, root / f"{n}.csv") for n, t in tasks.items()}
    return root, data


def _study(root, data, names=("alpha", "beta", "gamma"), **kw):
    return {"base_model": str(root / "base"), "scope": "qkv", "test_size": 40, "max_length": 32,
            "tasks": [{"name": n, "model": str(root / n), "data": str(data[n]), "text_column": "sentence"}
                      for n in names]} | kw


def test_study_prepares_a_run_with_the_checkpoints_heads(checkpoints, tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    root, data = checkpoints
    run = prepare_study(_study(root, data), tmp_path / "s")
    assert run.kind == "study" and run.names == ["alpha", "beta", "gamma"]
    assert run.task("gamma").adapter_dir is not None and run.task("alpha").model_dir is not None
    vs = run.vectors()
    assert vs["gamma"].scope == "lora" and vs["alpha"].scope == "qkv"
    assert "re:" in run.kernel_params()  # the kernel follows the vectors
    # the fine-tuned model read back through the study equals the checkpoint itself
    tok = AutoTokenizer.from_pretrained(root / "base")
    enc = tok(["the movie was good", "a sad plot"], padding=True, return_tensors="pt")
    hf = BertForSequenceClassification.from_pretrained(root / "alpha").eval()
    mine = run.finetuned_model("alpha")
    with torch.no_grad():
        torch.testing.assert_close(mine(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]),
                                   hf(**enc).logits, rtol=1e-5, atol=1e-5)
    # the same study again reuses the directory; another study there is refused
    assert prepare_study(_study(root, data), tmp_path / "s").names == run.names
    with pytest.raises(StudyError, match="holds another study"):
        prepare_study(_study(root, data, seed=1), tmp_path / "s")


def test_label_names_are_matched_and_mismatches_named(checkpoints, tmp_path):
    root, data = checkpoints
    t = toy_task("alpha", n=160, seed=0)
    flipped = _write_csv(t, tmp_path / "flipped.csv", label_names=["neg", "pos"])
    # data whose label order differs from the checkpoint's ids: rows are permuted, predictions unchanged
    text = flipped.read_text().replace(",neg\n", ",zneg\n")
    (tmp_path / "renamed.csv").write_text(text)
    bad = _study(root, data, names=("alpha", "beta"))
    bad["tasks"][0]["data"] = str(tmp_path / "renamed.csv")
    with pytest.raises(StudyError, match=r"checkpoint's labels \(neg, pos.*differ from the data's \(pos, zneg\)"):
        prepare_study(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change,match", [
    (lambda s: s["tasks"].pop(), "at least two tasks"),
    (lambda s: s["tasks"][1].update(name="alpha"), "repeated: alpha"),
    (lambda s: s["tasks"][0].update(text_column="nope"), "nope"),
    (lambda s: s["tasks"][0].update(metric="bleu"), "metric 'bleu'"),
    (lambda s: s.update(modle="x"), "unknown keys \\['modle'\\]"),
    (lambda s: s["tasks"][0].update(model="/nonexistent"), "neither a Hugging Face model directory"),
])
def test_bad_studies_are_one_line_errors(checkpoints, tmp_path, change, match):
    root, data = checkpoints
    s = _study(root, data, names=("alpha", "beta"))
    change(s)
    with pytest.raises(StudyError, match=match):
        prepare_study(s, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_adapter_of_another_base_is_refused(checkpoints, tmp_path):
    from transformers import BertConfig, BertModel

    root, data = checkpoints
    other = BertModel(BertConfig(**(BERT | {"hidden_size": 48, "intermediate_size": 96})))
    other.save_pretrained(tmp_path / "other")
    s = _study(root, data, names=("alpha", "gamma"))
    s["base_model"] = str(tmp_path / "other")
    with pytest.raises(StudyError, match="shape"):
        prepare_study(s, tmp_path / "x")


def test_validate_ntk_and_report_on_a_study_from_the_cli(checkpoints, tmp_path, capsys):
    root, data = checkpoints
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(_study(root, data)))
    out = tmp_path / "out"
    assert main(["validate", str(study), "--out", str(out), "--n-eval", "30", "--n-kernel", "8", "--rank", "2"]) == 0
    assert main(["ntk", str(study), "--out", str(out), "--n", "8", "--no-cross"]) == 0
    assert main(["report", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["kind"] == "study" and set(res["ntk"]["summary"]) == {"alpha", "beta", "gamma"}
    val = res["validation"]
    assert val["summary"]["n_predictions"] > 0 and set(val["finetuned_accuracy"]) == {"alpha", "beta", "gamma"}
    page = (out / "report" / "report.html").read_text()
    assert "Checkpoints" in page and str(root / "gamma") in page
    assert main(["validate", str(study)]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def test_load_study_from_yaml_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("base_model: minilm\ntasks: 3\n")
    with pytest.raises(StudyError, match="'tasks' must be a list"):
        load_study(p)
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "none.yaml")


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "llama"])
def test_checkpoint_heads_reproduce_the_hf_classifier(tmp_path, arch):
    """read_head + the base backbone = the checkpoint's own logits, for each head family."""
    import transformers as tf

    from taskvec.checkpoint_heads import read_head, write_head
    from taskvec.modeling import load_task_model

    torch.manual_seed(0)
    small = dict(vocab_size=120, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64)
    labels = {"id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}, "num_labels": 3}
    cfg, cls = {
        "bert": (tf.BertConfig(**small, num_hidden_layers=2, **labels), tf.BertForSequenceClassification),
        "roberta": (tf.RobertaConfig(**small, num_hidden_layers=2, pad_token_id=1, **labels),
                    tf.RobertaForSequenceClassification),
        "distilbert": (tf.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64, **labels),
                       tf.DistilBertForSequenceClassification),
        "llama": (tf.LlamaConfig(**small, num_hidden_layers=2, num_key_value_heads=2, pad_token_id=0, **labels),
                  tf.LlamaForSequenceClassification),
    }[arch]
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path / "ckpt")
    model.base_model.save_pretrained(tmp_path / "base")
    # the data lists the labels in another order: rows are permuted into it
    spec, state = read_head(tmp_path / "ckpt", tmp_path / "base", ["c", "a", "b"])
    assert spec.pooling == ("last" if arch == "llama" else "cls")
    write_head(tmp_path / "head", spec, state)
    mine = load_task_model(tmp_path / "head", backbone=tmp_path / "base").eval()
    ids = torch.randint(2, 120, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding, with the pad token (decoders' HF pooling looks for it)
    ids[0, 5:] = cfg.pad_token_id or 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits[:, [2, 0, 1]]
        got = mine(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_study_of_decoder_sequence_classifiers(tmp_path):
    """Tiny Llama sequence classifiers (a `score` head on the last token), trained by a plain loop."""
    from conftest import save_tiny
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    import taskvec

    base = save_tiny(tmp_path / "base", "llama")
    tok = AutoTokenizer.from_pretrained(base)
    data = {}
    for i, name in enumerate(("left", "right")):
        cfg = LlamaConfig.from_pretrained(base)
        cfg.num_labels, cfg.id2label, cfg.label2id = 2, {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
        m = LlamaForSequenceClassification(cfg)
        m.model.load_state_dict(LlamaForSequenceClassification.from_pretrained(base, num_labels=2).model.state_dict())
        task = toy_task(name, n=120, seed=i)
        _train(m, tok, task, steps=6, seed=i).save_pretrained(tmp_path / name)
        data[name] = _write_csv(task, tmp_path / f"{name}.csv")
    study = {"base_model": str(base), "scope": "qkv", "test_size": 30, "max_length": 24,
             "tasks": [{"name": n, "model": str(tmp_path / n), "data": str(data[n]), "text_column": "sentence"}
                       for n in ("left", "right")]}
    run = prepare_study(study, tmp_path / "s")
    assert all(run.task(t).head.pooling == "last" and run.task(t).head.kind == "mlp" for t in run.names)
    res = taskvec.validate_run(run, n_eval=20, n_kernel=6, rank=2, lambdas=[0.5, 1.0], progress=False)
    assert res["summary"]["n_predictions"] > 0 and res["summary"]["heldout"]["n_holdout"] == {"left": 10, "right": 10}


def test_in_memory_data_is_named_by_content(checkpoints, tmp_path):
    root, data = checkpoints
    t = toy_task("alpha", n=160, seed=0)
    cols = {"sentence": t.texts, "label": [t.label_names[y] for y in t.labels]}  # a mapping of columns (as a Dataset)
    s = _study(root, data, names=("alpha", "beta"))
    s["tasks"][0]["data"] = cols
    run = prepare_study(s, tmp_path / "s")
    assert len(run.task("alpha").task) == 160 and "sha256" in run.study["tasks"][0]["data"]
    cols2 = dict(cols, label=list(reversed(cols["label"])))
    s["tasks"][0]["data"] = cols2
    with pytest.raises(StudyError, match="holds another study"):  # changed data: not reused silently
        prepare_study(s, tmp_path / "s")


def test_in_memory_data_with_a_missing_column_is_a_study_error(checkpoints, tmp_path):
    root, data = checkpoints
    s = _study(root, data, names=("alpha", "beta"))
    s["tasks"][0]["data"] = {"text": ["a b c"] * 9, "label": [0, 1, 2] * 3}
    with pytest.raises(StudyError, match="in-memory data: .*column 'sentence' not found"):
        prepare_study(s, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_study_can_name_a_task_of_a_taskvec_run(tiny_run, tmp_path):
    """`model: {run: DIR, task: NAME}`: the run task's own head and vector, beside an HF checkpoint of the same base."""
    from taskvec.runs import Run

    src = Run.open(tiny_run, require="vectors")
    t = src.task("a").task
    csv = _write_csv(t, tmp_path / "a.csv")
    study = {"base_model": src.base_model, "scope": src.scope, "test_size": 30, "max_length": 32,
             "tasks": [{"name": "a", "model": {"run": str(tiny_run), "task": "a"}, "data": str(csv),
                        "text_column": "sentence"},
                       {"name": "b", "model": {"run": str(tiny_run)}, "data": str(_write_csv(src.task("b").task,
                                                                                         tmp_path / "b.csv")),
                        "text_column": "sentence"}]}
    run = prepare_study(study, tmp_path / "s")
    for name in ("a", "b"):
        got, want = run.vector(name), src.vector(name)
        assert set(got.deltas) == set(want.deltas)
        assert all(torch.equal(got.deltas[k], want.deltas[k]) for k in want.deltas)
        assert run.task(name).head.kind == "linear"
    assert run.description()["sources"]["a"]["kind"] == "run"
    # a run task of another base (same architecture, other weights) is refused
    from conftest import save_tiny

    study["base_model"] = str(save_tiny(tmp_path / "other", "bert", seed=1))
    with pytest.raises(StudyError, match="was fine-tuned from"):
        prepare_study(study, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_study_of_a_model_linear_in_its_parameters_predicts_exactly(tmp_path):
    """Checkpoints that differ from the base only in the final RMSNorm weight w: a Llama classifier's logits
    score(w ⊙ h / rms(h)) are linear in w, so every prediction — first order, second order, every merge —
    must equal its measurement, through the whole study path (HF checkpoints saved by a plain loop, their
    own heads, vectors, kernels, predictions, measurements and the coefficient choice)."""
    from conftest import save_tiny
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    import taskvec

    base = save_tiny(tmp_path / "base", "llama")
    tok = AutoTokenizer.from_pretrained(base)
    data = {}
    for i, name in enumerate(("left", "right")):
        cfg = LlamaConfig.from_pretrained(base)
        cfg.num_labels, cfg.id2label, cfg.label2id = 2, {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
        m = LlamaForSequenceClassification(cfg)
        m.model.load_state_dict(LlamaForSequenceClassification.from_pretrained(base, num_labels=2).model.state_dict())
        for n, p in m.named_parameters():  # a plain loop that trains only the final norm (and the head)
            p.requires_grad_(n in ("model.norm.weight", "score.weight"))
        task = toy_task(name, n=120, seed=i)
        _train(m, tok, task, steps=8, lr=3e-2, seed=i).save_pretrained(tmp_path / name)
        data[name] = _write_csv(task, tmp_path / f"{name}.csv")
    study = {"base_model": str(base), "scope": "full", "test_size": 40, "max_length": 24,
             "tasks": [{"name": n, "model": str(tmp_path / n), "data": str(data[n]), "text_column": "sentence"}
                       for n in ("left", "right")]}
    run = prepare_study(study, tmp_path / "s")
    vs = run.vectors()
    moved = {t: sorted(k for k, d in vs[t].deltas.items() if d.abs().max() > 0) for t in run.names}
    assert all(ks == ["norm.weight"] or ks == ["model.norm.weight"] for ks in moved.values()), moved
    # the NTK-aware merges project onto eigenspaces of gradients over every parameter of the scope: their
    # directions leave the norm weight, where the model is not linear, so they are left out here
    res = taskvec.validate_run(run, n_eval=20, n_kernel=6, rank=2, lambdas=[0.5, 1.0, 2.0], progress=False,
                               ntk_aware=False)
    entries = [(m["name"], s, e) for m in res["merges"] for s, e in m["per_task"].items()]
    assert len(entries) >= 8
    for name, s, e in entries:
        assert e["lin_error"] < 1e-4 and e["lin_error_2nd"] < 1e-4, (name, s, e)
        assert e["predicted_1st"] == e["measured"] and e["predicted_2nd"] == e["measured"], (name, s, e)
        assert e["curvature"] < 1e-3, (name, s, e)
    moved_any = [e for _, _, e in entries if e["measured"] != e["base"]]
    assert moved_any, "the merges must change some predictions for the check to mean anything"
    co = res["coefficients"]  # the measured λ grid and the prediction-chosen coefficients: predicted = measured
    for g in co["grid"] + [co["chosen"]["global"], co["chosen"]["per_task"]]:
        assert g["predicted"] == pytest.approx(g["measured"], abs=1e-9), g
