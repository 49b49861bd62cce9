"""`taskvec finetune` with causal-LM objectives (taskvec.lm_objective) on a tiny random Llama with a
byte-level BPE tokenizer: the losses it logs are lm_metrics' harness figures, training lowers them, the
task directory round-trips, LoRA works, and objectives that do not fit are refused in one line."""

import dataclasses
import json

import pytest
import torch
from conftest import toy_task

from taskvec import lm_metrics as lm
from taskvec.errors import TaskvecError
from taskvec.finetune import FinetuneConfig, finetune
from taskvec.modeling import load_task_model, load_tokenizer
from taskvec.tasks import load_task, make_splits


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random Llama (tied embeddings) saved with a byte-level BPE tokenizer trained on toy texts."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    texts = toy_task("x", n=200).texts + ["Review: a\nSentiment: negative positive neg pos"] * 5
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<bos>", "<eos>", "<pad>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>")
    torch.manual_seed(0)
    m = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                               tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    path = tmp_path_factory.mktemp("lm") / "llama"
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _tasks():
    text = dataclasses.replace(toy_task("domain", n=120), objective="lm")
    choice = dataclasses.replace(toy_task("mc", n=120, seed=1), objective="choice", label_words=["neg", "pos"],
                                 prompt="Review: {text}\nSentiment:")
    return text, choice


CFG = dict(scope="qkv", max_steps=8, eval_every=4, lr=1e-2, test_size=24, val_size=12, device="cpu",
           attn_implementation="eager", batch_size=8, eval_batch_size=16)


def test_lm_objectives_log_the_harness_losses_and_lower_them(tiny_lm, tmp_path):
    text, choice = _tasks()
    res = finetune(tiny_lm, [text, choice], tmp_path / "run", FinetuneConfig(**CFG), progress=False)
    tok = load_tokenizer(tiny_lm)
    for task, r in zip((text, choice), res):
        d = tmp_path / "run" / "finetune" / task.name
        log = json.loads((d / "log.json").read_text())
        assert [c["step"] for c in log["curve"]] == [0, 4, 8] and all("val_loss" in c for c in log["curve"])
        model = load_task_model(d)
        assert model.spec.kind == "lm"
        test = make_splits(task, 0, 24, 12).test
        if task.objective == "lm":
            want = lm.text_loss(model, tok, [task.texts[i] for i in test], max_length=128)
        else:
            want = lm.completion_loss(model, tok, [task.prompt.format(text=task.texts[i]) for i in test],
                                      [" " + task.label_words[task.labels[i]] for i in test])
        # the logged test loss is Σ NLL / Σ tokens of exactly those continuations (lm_metrics' figure)
        assert log["test"]["loss"] == pytest.approx(want.mean_nll, rel=1e-5)
        assert log["test"]["n"] == int(want.n_tokens.sum())
        assert r.test_loss < log["probe"]["test_loss"]  # fine-tuning lowered the held-out LM loss


def test_lora_scope_and_the_task_vector_of_an_lm_run(tiny_lm, tmp_path):
    from taskvec.finetune import extract_vectors

    text, _ = _tasks()
    cfg = FinetuneConfig(**{**CFG, "scope": "lora", "max_steps": 2, "eval_every": 2})
    finetune(tiny_lm, [text], tmp_path / "run", cfg, progress=False)
    assert (tmp_path / "run" / "finetune" / "domain" / "adapter").is_dir()
    vecs = extract_vectors(tmp_path / "run")
    assert float(vecs["domain"].norm()) > 0


def test_bundled_lm_tasks_keep_their_data_under_an_lm_objective():
    sms, choice = load_task("sms_lm"), load_task("sentiment_choice")
    assert sms.objective == "lm" and sms.texts == load_task("sms_spam").texts
    assert choice.objective == "choice" and "{text}" in choice.prompt and choice.label_words


def test_objectives_that_do_not_fit_are_one_line_errors(tiny_lm, tiny_bert, tmp_path):
    text, choice = _tasks()
    with pytest.raises(TaskvecError, match="objective 'lm' needs a decoder LM") as e:
        finetune(tiny_bert, [text], tmp_path / "enc", FinetuneConfig(**CFG), progress=False)
    assert "\n" not in str(e.value)
    bad = dataclasses.replace(choice, prompt="Sentiment of the review:")
    with pytest.raises(TaskvecError, match=r"prompt 'Sentiment of the review:' does not name the text column"):
        finetune(tiny_lm, [bad], tmp_path / "p", FinetuneConfig(**CFG), progress=False)
    with pytest.raises(ValueError, match="the spectral rule needs a classification objective"):
        FinetuneConfig(objective="lm", early_stopping=["spectral"])
    with pytest.raises(ValueError, match="objective must be"):
        FinetuneConfig(objective="perplexity")
