import json

import pytest
import torch
from conftest import toy_task

from taskvec.errors import OutputExistsError
from taskvec.finetune import FinetuneConfig, extract_vectors, finetune, finetune_task
from taskvec.modeling import ModelError, load_backbone, load_task_model, resolve_model
from taskvec.stopping import Patience, make_rule
from taskvec.task_vector import TaskVector

FAST = {"max_steps": 12, "eval_every": 4, "lr": 1e-3, "test_size": 24, "val_size": 16, "device": "cpu", "batch_size": 8}


def test_patience_stops_on_plateau():
    r = Patience(patience=2, min_delta=0.01, metric="val_loss", mode="min")
    seq = [1.0, 0.8, 0.795, 0.81, 0.79]  # improvement, then two evaluations within min_delta
    decisions = [r.update(10 * (i + 1), {"val_loss": v}) for i, v in enumerate(seq)]
    assert decisions[:3] == [None, None, None]
    assert decisions[3] is not None and decisions[3].restore_step == 20 and decisions[3].step == 40
    assert r.update(5, None) is None  # non-evaluation steps are ignored
    r2 = Patience(patience=1, metric="val_accuracy", mode="max")
    assert r2.update(1, {"val_accuracy": 0.5}) is None and r2.update(2, {"val_accuracy": 0.5}) is not None
    with pytest.raises(ValueError, match="valid: none, patience, spectral|valid: patience"):
        make_rule("bogus")


def test_finetune_writes_everything_and_vectors_reproduce(tiny_bert, tmp_path):
    cfg = FinetuneConfig(**FAST)
    res = finetune(tiny_bert, [toy_task("a"), toy_task("b", seed=1)], tmp_path / "run", cfg)
    assert [r.task for r in res] == ["a", "b"]
    d = tmp_path / "run" / "finetune" / "a"
    log = json.loads((d / "log.json").read_text())
    assert log["curve"][0]["step"] == 0 and log["curve"][-1]["step"] == log["steps"]
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(log["curve"][1])
    assert log["stop_reason"] and "best_step" in log and log["config"]["scope"] == "qkv"
    split = json.loads((d / "split.json").read_text())
    assert len(split["test"]) == 24 and len(split["val"]) == 12  # val capped at 10% of 120
    assert not list((tmp_path / "run" / "finetune").glob(".*"))  # no temp or checkpoint leftovers
    # the saved task model loads with plain transformers (backbone) and with taskvec (backbone + head)
    from transformers import AutoModel
    AutoModel.from_pretrained(d / "model")
    tm = load_task_model(d)
    vs = extract_vectors(tmp_path / "run")
    assert set(vs) == {"a", "b"} and (tmp_path / "run" / "vectors" / "a.safetensors").exists()
    rebuilt = vs["a"].apply_to(load_backbone(tiny_bert))
    for (n, p), (_, q) in zip(rebuilt.named_parameters(), tm.backbone.named_parameters()):
        assert torch.allclose(p, q, atol=1e-7, rtol=0), n
    # qkv scope: nothing outside Q/K/V moved
    base = load_backbone(tiny_bert)
    for (n, p), (_, q) in zip(base.named_parameters(), tm.backbone.named_parameters()):
        assert torch.equal(p, q) == ("attention.self" not in n or n.endswith("bias")), n
    # re-running resumes (reuses finished tasks) instead of redoing them
    again = finetune(tiny_bert, [toy_task("a")], tmp_path / "run", cfg)
    assert again[0].wall_time_s == res[0].wall_time_s


def test_existing_output_refused(tiny_bert, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="exists; pass overwrite=True"):
        finetune_task(tiny_bert, toy_task(), out, FinetuneConfig(**FAST))


def test_gpt2_qv_changes_only_q_and_v_columns(tiny_dirs, tmp_path):
    cfg = FinetuneConfig(**FAST, scope="qv", head="random", train_head=False, weight_decay=0.1)
    finetune_task(tiny_dirs["gpt2"], toy_task(), tmp_path / "g", cfg)
    base = load_backbone(tiny_dirs["gpt2"])
    ft = load_task_model(tmp_path / "g").backbone
    for (n, p), (_, q) in zip(base.named_parameters(), ft.named_parameters()):
        if n.endswith("attn.c_attn.weight"):
            d = (q - p).abs()
            assert d[:, 32:64].sum() == 0, "K columns moved"
            assert d[:, :32].sum() > 0 and d[:, 64:].sum() > 0
        else:
            assert torch.equal(p, q), n


def test_llama_label_word_head_has_no_new_parameters(tiny_dirs, tmp_path):
    cfg = FinetuneConfig(**FAST, scope="qkv")
    t = toy_task()
    t.label_words = ["bad", "good"]
    r = finetune_task(tiny_dirs["llama"], t, tmp_path / "l", cfg)
    spec = json.loads((tmp_path / "l" / "head.json").read_text())
    assert spec["kind"] == "label_words" and spec["pooling"] == "last" and spec["tied"]
    tm = load_task_model(tmp_path / "l")
    assert sum(p.numel() for p in tm.head.parameters()) == 0
    assert 0 <= r.test_accuracy <= 1


def test_lora_scope_vector_is_exact(tiny_bert, tmp_path):
    cfg = FinetuneConfig(**FAST, scope="lora", lora_r=2, lora_alpha=4, use_rslora=True)
    finetune(tiny_bert, [toy_task("a")], tmp_path / "run", cfg)
    assert (tmp_path / "run" / "finetune" / "a" / "adapter" / "adapter_config.json").exists()
    tv = extract_vectors(tmp_path / "run")["a"]
    assert tv.scope == "lora" and len(tv.deltas) == 4  # query + value in 2 layers
    merged = TaskVector.from_models(tiny_bert, tmp_path / "run" / "finetune" / "a", scope="qv")
    for k in tv.deltas:
        assert torch.allclose(tv.deltas[k], merged.deltas[k], atol=1e-6), k
    assert tv.base_fingerprint == merged.base_fingerprint


def test_nan_loss_stops_and_keeps_last_good(tiny_bert, tmp_path, monkeypatch):
    import taskvec.finetune as ft

    real, calls = ft.loss_fn, {"n": 0}

    def poisoned(*a, **k):  # the loss turns NaN at step 7, after the evaluation at step 4
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(ft, "loss_fn", poisoned)
    cfg = FinetuneConfig(**FAST, early_stopping=[])
    r = finetune_task(tiny_bert, toy_task(), tmp_path / "n", cfg)
    assert r.stop_reason.startswith("non-finite loss (nan) at step 7") and "step 4" in r.stop_reason
    assert r.steps == 6
    tm = load_task_model(tmp_path / "n")
    assert all(torch.isfinite(p).all() for p in tm.parameters())


def test_resume_from_checkpoint(tiny_bert, tmp_path, monkeypatch):
    import taskvec.finetune as ft

    cfg = FinetuneConfig(**FAST, early_stopping=[])
    calls = {"n": 0}
    real = ft.loss_fn

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(ft, "loss_fn", crashing)
    with pytest.raises(KeyboardInterrupt):
        finetune_task(tiny_bert, toy_task(), tmp_path / "r", cfg)
    assert not (tmp_path / "r").exists() and (tmp_path / ".r.ckpt" / "state.json").exists()
    monkeypatch.setattr(ft, "loss_fn", real)
    res = finetune_task(tiny_bert, toy_task(), tmp_path / "r", cfg)
    assert res.steps == 12 and [c["step"] for c in res.curve] == [0, 4, 8, 12]
    assert not (tmp_path / ".r.ckpt").exists()


def test_unknown_model_lists_valid():
    with pytest.raises(ModelError, match="Short names: minilm"):
        resolve_model("no-such-model")


def test_bad_config_values():
    with pytest.raises(ValueError, match="optimizer"):
        FinetuneConfig(optimizer="adam")
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        FinetuneConfig(max_steps=0)
    assert FinetuneConfig(early_stopping="none").early_stopping == []


@pytest.mark.slow
def test_real_minilm_beats_majority(tmp_path):
    from taskvec.tasks import load_task
    t = load_task("sms_spam")
    cfg = FinetuneConfig(max_steps=30, eval_every=15, lr=5e-4, max_train=300, test_size=300, val_size=100,
                         device="cpu")
    r = finetune_task("minilm", t, tmp_path / "sms", cfg, progress=False)
    assert r.test_accuracy > r.majority_accuracy + 0.02


@pytest.mark.slow
def test_smollm2_converts_once_and_classifies_with_label_words(tmp_path, monkeypatch):
    """The embedded decoder: converted from its GGUF into a cached safetensors dir, then a label-word head."""
    import time

    from taskvec.modeling import resolve_model
    from taskvec.tasks import load_task

    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    path = resolve_model("smollm2")
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    t0 = time.time()
    assert resolve_model("smollm2") == path and time.time() - t0 < 1.0  # cached: no second conversion
    t = load_task("sms_spam")
    # the label-word head's logits are exactly the LM's logits of the label words at the last prompt token
    from transformers import AutoModelForCausalLM

    from taskvec.finetune import build_task_model
    from taskvec.modeling import load_tokenizer
    from taskvec.tasks import Batches

    tok = load_tokenizer("smollm2")
    tm = build_task_model("smollm2", t, tok, None, FinetuneConfig(head="label_words", attn_implementation="eager"))
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    b = next(iter(Batches(tok, t, list(range(4)), 4, max_length=48, prompt=t.prompt)))
    with torch.no_grad():
        ours = tm.eval()(b["input_ids"], b["attention_mask"])
        full = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    last = b["attention_mask"].sum(1) - 1
    want = full[torch.arange(4), last][:, tm.spec.token_ids]
    assert torch.allclose(ours, want, atol=1e-3)
    assert sum(p.numel() for p in tm.head.parameters()) == 0
    cfg = FinetuneConfig(max_steps=2, eval_every=2, lr=1e-5, max_train=32, test_size=32, val_size=16,
                         device="cpu", batch_size=4, max_length=48)
    # (zero-shot accuracy of this prompt is poor: the LM prefers " spam" after "This message is")
    finetune_task("smollm2", t, tmp_path / "sms", cfg, progress=False)
    spec = json.loads((tmp_path / "sms" / "head.json").read_text())
    assert spec["kind"] == "label_words" and spec["label_words"] == ["normal", "spam"]
    assert (tmp_path / "sms" / "model" / "model.safetensors").exists()


def test_top_level_finetune_is_callable_even_after_the_module_is_imported(tiny_bert, tmp_path):
    import taskvec
    import taskvec.finetune as mod  # binds the package attribute to the module

    assert taskvec.finetune is mod and callable(taskvec.finetune)
    res = taskvec.finetune(tiny_bert, [toy_task("a")], tmp_path / "r", FinetuneConfig(**FAST), progress=False)
    assert res[0].task == "a"


def test_cli_flags_are_generated_from_every_config_field():
    import argparse
    from dataclasses import fields

    from taskvec.cli import _add_finetune_args, _finetune_config

    p = argparse.ArgumentParser()
    _add_finetune_args(p)
    dests = {a.dest: a for a in p._actions}
    for f in fields(FinetuneConfig):
        assert f.name in dests, f"no flag for FinetuneConfig.{f.name}"
        shown = p._get_formatter()._expand_help(dests[f.name])  # what --help prints
        assert f.metadata.get("help") and f.metadata["help"] in shown and "(default: " in shown, f.name
    assert _finetune_config(p.parse_args([])) == FinetuneConfig()
    # the flag names in use before the flags were generated
    old = _finetune_config(p.parse_args([
        "--scope", "lora", "--train-head", "--rslora", "--lora-targets", "query,value", "--lora-r", "4",
        "--early-stopping", "patience,spectral", "--rule-arg", "spectral.max_examples=256", "--metric",
        "val_accuracy", "--max-train", "100", "--device", "cpu"]))
    assert old == FinetuneConfig(scope="lora", train_head=True, use_rslora=True, lora_targets=["query", "value"],
                                 lora_r=4, early_stopping=["patience", "spectral"], metric="val_accuracy",
                                 rule_args={"spectral": {"max_examples": 256}}, max_train=100, device="cpu")
    new = _finetune_config(p.parse_args([
        "--no-train-head", "--momentum", "0.9", "--grad-clip", "none", "--max-train", "None",
        "--eval-batch-size", "8", "--probe-C", "0.5", "--lora-dropout", "0.1", "--attn-implementation", "eager",
        "--label-noise", "0.2", "--test-curve", "--eval-steps", "7,3", "5", "--early-stopping", "none",
        "--rule-args", '{"patience": {"patience": 3}, "spectral": {"a": 1}}', "--rule-arg", "spectral.a=2"]))
    assert new == FinetuneConfig(momentum=0.9, grad_clip=None, max_train=None, eval_batch_size=8, probe_C=0.5,
                                 lora_dropout=0.1, attn_implementation="eager", label_noise=0.2, test_curve=True,
                                 eval_steps=[3, 5, 7], early_stopping=[],
                                 rule_args={"patience": {"patience": 3}, "spectral": {"a": 2}})
    assert _finetune_config(p.parse_args(["--lora-targets", "none", "--probe-c", "2"])).lora_targets is None
    with pytest.raises(SystemExit):
        p.parse_args(["--eval-steps", "x"])


def test_task_result_repr_and_html():
    from taskvec.finetune import TaskResult, results_table

    r = TaskResult("sms <spam>", "/x", "patience: no val_loss improvement > 0.0 in 2 evaluations (best 0.1 at "
                   "step 50)", 50, 100, 0.8, 0.9, 0.3, 0.5, 12.0)
    text = repr(r)
    assert "sms <spam>" in text and "80.0% probe -> 90.0% fine-tuned" in text and "best step 50/100" in text
    assert "(best 0.1 at step 50)" in text
    h = r._repr_html_()
    assert h.startswith("<table") and h.count("<tr>") == 2 and "sms &lt;spam&gt;" in h and "step 50)" in h
    assert "in 2 evaluations (best 0.1 at step 50) |" in results_table([r])  # the whole stop reason
