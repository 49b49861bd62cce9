"""Studies of causal-LM checkpoints made elsewhere (metric lm_loss / multiple_choice): the checkpoint's LM
head becomes the task's head, θ0 + τ with that head reproduces the checkpoint's own loss, `taskvec validate
STUDY` predicts and measures in nats, and studies that do not fit are refused in one line."""

import pytest
import torch
from conftest import toy_task
from test_lm_finetune import tiny_lm  # noqa: F401 (fixture)

from taskvec import lm_metrics as lm
from taskvec.study import StudyError, load_study, prepare_study


@pytest.fixture(scope="module")
def lm_ckpts(tiny_lm, tmp_path_factory):  # noqa: F811
    """A tiny LlamaForCausalLM base (untied head) and two fine-tuned checkpoints of it, with data files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    d = tmp_path_factory.mktemp("lmstudy")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    for i, name in enumerate(("a", "b")):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith(("q_proj.weight", "v_proj.weight", "lm_head.weight")):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.save_pretrained(d / name)
    for name, seed in (("texts", 0), ("reviews", 1)):
        t = toy_task(name, n=60, seed=seed)
        (d / f"{name}.csv").write_text("text,label\n" + "".join(f'"{x}",{t.label_names[y]}\n'
                                                               for x, y in zip(t.texts, t.labels)))
    return d


def _study(d, over=None):
    s = {"base_model": str(d / "base"), "scope": "qkv", "test_size": 16, "max_length": 48,
         "tasks": [{"name": "texts", "model": str(d / "a"), "data": str(d / "texts.csv"), "metric": "lm_loss"},
                   {"name": "reviews", "model": str(d / "b"), "data": str(d / "reviews.csv"),
                    "metric": "multiple_choice", "prompt": "Review: {text}\nSentiment:"}]}
    for i, kw in (over or {}).items():
        s["tasks"][i] = {**s["tasks"][i], **kw}
    return s


def test_an_lm_study_keeps_each_checkpoints_lm_head_and_reproduces_its_loss(lm_ckpts):
    from transformers import AutoModelForCausalLM

    run = prepare_study(_study(lm_ckpts), lm_ckpts / "study")
    assert [run.task(s).head.kind for s in run.names] == ["lm", "lm"]
    assert run.task("reviews").task.objective == "choice" and run.task("texts").task.objective == "lm"
    tok = run.tokenizer()
    texts = [run.task("texts").task.texts[i] for i in run.sample("texts", "test", 6)]
    ckpt = AutoModelForCausalLM.from_pretrained(lm_ckpts / "a").eval()
    with torch.no_grad():  # the checkpoint's own loss vs the study's θ0 + τ with the checkpoint's LM head
        want = lm.text_loss(ckpt, tok, texts).mean_nll
        got = lm.text_loss(run.finetuned_model("texts"), tok, texts).mean_nll
        base = lm.text_loss(run.base_task_model("texts"), tok, texts).mean_nll
    assert got == pytest.approx(want, rel=1e-5) and abs(base - want) > 1e-3


def test_taskvec_validate_of_an_lm_study(lm_ckpts, tmp_path):
    import json

    import yaml

    from taskvec.cli import main

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_study(lm_ckpts)))
    out = tmp_path / "out"
    assert main(["validate", str(path), "--out", str(out), "--n-eval", "4", "--n-probe", "2"]) == 0
    res = json.loads((out / "validation" / "lm_results.json").read_text())
    assert {r["task"] for r in res["rows"]} == {"texts", "reviews"}
    assert all("acc_measured" in r for r in res["rows"] if r["task"] == "reviews")


def test_lm_studies_that_do_not_fit_are_refused(lm_ckpts, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    with pytest.raises(StudyError, match="all its tasks by accuracy or all by likelihood"):
        load_study(_study(lm_ckpts, {1: {"metric": "accuracy", "prompt": None}}))
    with pytest.raises(StudyError, match="prompt and label_words belong to metric multiple_choice"):
        load_study(_study(lm_ckpts, {0: {"prompt": "{text}"}}))
    with pytest.raises(StudyError, match="must be a string naming the text column"):
        prepare_study(_study(lm_ckpts, {1: {"prompt": "Review:"}}), tmp_path / "s1")
    with pytest.raises(StudyError, match="label_words must be a list of 2 non-empty strings"):
        prepare_study(_study(lm_ckpts, {1: {"label_words": ["good"]}}), tmp_path / "s2")
    cfg = LlamaConfig.from_pretrained(lm_ckpts / "base")
    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    with pytest.raises(StudyError, match=r"needs a causal LM checkpoint \(…ForCausalLM\); this one is "
                                         "LlamaForSequenceClassification"):
        prepare_study(_study(lm_ckpts, {0: {"model": str(tmp_path / "cls")}}), tmp_path / "s3")
    assert not (tmp_path / "s3").exists()
