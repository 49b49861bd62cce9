"""LM metrics (taskvec.lm_metrics) against slow references written from the definitions: one full forward
pass of a tiny random Llama per (prompt, choice) or text, and the model's own ``labels=`` loss."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

from taskvec import lm_metrics as lm

CORPUS = ["the film was great and the plot was good", "a dull plot and bad acting", "spam offer win a prize now",
          "question: what is the capital of france? answer: paris", "review: i loved it. sentiment: positive",
          "review: boring and long. sentiment: negative", "positive negative neutral maybe yes no"] * 3


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style: a leading space is part of the next token)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<bos>", "<eos>", "<pad>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=True, attn_implementation="eager", pad_token_id=tok.pad_token_id)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the initialisation's, so choices are far from ties
        m.model.embed_tokens.weight.mul_(30.0)
    return m


def ref_loglik(model, ctx: list[int], cont: list[int]) -> float:
    """Σ log p(cont_j | ctx, cont_<j) from one unpadded forward pass of ctx + cont (the definition)."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = len(ctx)
    return sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cont))


def test_encode_pair_moves_trailing_spaces_and_splits_the_joint_encoding(tok):
    ctx, cont = lm.encode_pair(tok, "review: i loved it. sentiment: ", "positive")
    assert ctx + cont == lm.encode(tok, "review: i loved it. sentiment: positive")
    assert ctx == lm.encode(tok, "review: i loved it. sentiment:")
    assert tok.decode(cont) == " positive"  # the space travels with the continuation, as in the harness
    ctx, cont = lm.encode_pair(tok, "", "the film")
    assert ctx == [tok.bos_token_id] and cont == lm.encode(tok, "the film")


def test_multiple_choice_equals_one_forward_pass_per_choice(model, tok):
    prompts = ["review: i loved it. sentiment:", "question: what is the capital of france? answer:",
               "a dull plot and", "spam offer"]
    choices = [["positive", "negative"], ["paris", "the film was great", "no", "maybe yes"],
               ["bad acting", "good"], ["win a prize now", "neutral", "yes"]]
    labels = [0, 0, 1, 2]
    want = [[ref_loglik(model, *lm.encode_pair(tok, p, " " + c)) for c in cs] for p, cs in zip(prompts, choices)]
    lengths = {len(lm.encode_pair(tok, p, " " + c)[1]) for p, cs in zip(prompts, choices) for c in cs}
    assert len(lengths) >= 3  # choices of different token lengths
    for side in ("right", "left"):
        for bs in (1, 3, 16):
            r = lm.multiple_choice(model, tok, prompts, choices, labels, batch_size=bs, padding_side=side)
            for got, w in zip(r.scores, want):
                assert torch.allclose(got, torch.tensor(w, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    pred = [max(range(len(w)), key=lambda j: w[j]) for w in want]
    pred_norm = [max(range(len(w)), key=lambda j: w[j] / len(cs[j])) for w, cs in zip(want, choices)]
    for w, cs in zip(want, choices):  # no decision here is a near tie
        s, sn = sorted(w), sorted(x / len(c) for x, c in zip(w, cs))
        assert s[-1] - s[-2] > 1e-2 and sn[-1] - sn[-2] > 1e-3
    assert r.pred == pred and r.pred_norm == pred_norm
    assert r.acc == sum(p == y for p, y in zip(pred, labels)) / 4
    assert r.acc_norm == sum(p == y for p, y in zip(pred_norm, labels)) / 4


def test_choice_predictions_acc_and_acc_norm_differ_by_length():
    scores = [torch.tensor([-4.0, -6.0]), torch.tensor([-1.0, -3.0, -2.5])]
    chars = [[2, 6], [1, 10, 10]]
    pred, pred_norm = lm.choice_predictions(scores, chars)
    assert pred == [0, 0] and pred_norm == [1, 2]  # -6/6 > -4/2; -2.5/10 > -3/10 > -1/1
    assert lm.accuracy_of(pred, [1, 2]) == 0.0 and lm.accuracy_of(pred_norm, [1, 2]) == 1.0


def test_text_loss_equals_the_models_labels_loss_and_aggregates_sum_over_sum(model, tok):
    texts = ["the film was great and the plot was good", "a dull plot", "spam offer win a prize now now now"]
    r = lm.text_loss(model, tok, texts, batch_size=2)
    nll, counts = [], []
    for t in texts:
        ids = torch.tensor([[tok.bos_token_id] + lm.encode(tok, t)])
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)  # HF shifts: every text token scored
        nll.append(loss * (ids.shape[1] - 1))
        counts.append(ids.shape[1] - 1)
    assert r.n_tokens.tolist() == counts
    assert torch.allclose(r.nll, torch.tensor(nll, dtype=torch.float64), rtol=1e-5)
    assert r.mean_nll == pytest.approx(sum(nll) / sum(counts), rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(sum(nll) / sum(counts)), rel=1e-5)
    mean_of_ppl = sum(math.exp(a / b) for a, b in zip(nll, counts)) / 3
    assert abs(r.perplexity - mean_of_ppl) > 1e-3 * r.perplexity  # the corpus figure is not a mean of ppls


def test_completion_loss_scores_completion_tokens_only(model, tok):
    prompts, comps = ["review: i loved it. sentiment:", "question: what is"], [" positive", " the capital of france"]
    r = lm.completion_loss(model, tok, prompts, comps, padding_side="left")
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ctx, cont = lm.encode_pair(tok, p, c)
        ids = torch.tensor([ctx + cont])
        labels = ids.clone()
        labels[0, :len(ctx)] = -100
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=labels).loss)
        assert r.n_tokens[i] == len(cont)
        assert float(r.nll[i]) == pytest.approx(loss * len(cont), rel=1e-5)


def test_rolling_windows_score_every_token_once_with_the_tokens_before_it(model, tok):
    toks = lm.encode(tok, " ".join(CORPUS[:4]))
    prefix = tok.bos_token_id
    wins = lm.rolling_windows(toks, prefix, max_length=8)
    assert sum((c for _, c in wins), []) == toks
    full = [prefix] + toks
    at = 1
    for ctx, cont in wins:
        assert len(ctx) + len(cont) <= 9 and ctx and cont
        assert full[at - len(ctx):at + len(cont)] == ctx + cont  # conditioned on the tokens right before it
        at += len(cont)
    long = lm.text_loss(model, tok, [" ".join(CORPUS[:4])], max_length=8)
    assert int(long.n_tokens[0]) == len(toks)
    want = sum(ref_loglik(model, c, t) for c, t in wins)
    assert float(long.nll[0]) == pytest.approx(-want, rel=1e-5)


def test_base_decoder_with_tied_embeddings_gives_the_causal_lm_logits(model, tok):
    base = model.model
    ids = torch.tensor([lm.encode(tok, "a dull plot and bad acting")])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(lm.lm_logits(base, ids, mask), model(input_ids=ids).logits, atol=1e-4)
    untied = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, tie_word_embeddings=False))
    with pytest.raises(lm.LMError, match="no LM head"):
        lm.lm_logits(untied, ids % 50, mask)


def test_too_long_prompts_are_truncated_and_counted_too_long_continuations_refused(model, tok):
    long_prompt = " ".join(CORPUS[:5])
    n = len(lm.encode(tok, long_prompt))
    r = lm.completion_loss(model, tok, [long_prompt, "a dull"], [" plot", " plot"], max_length=n // 2)
    assert r.truncated == 1
    ctx, cont = lm.encode_pair(tok, long_prompt, " plot")
    keep = (ctx + cont)[-(n // 2 + 1):]
    assert float(r.nll[0]) == pytest.approx(-ref_loglik(model, keep[:-len(cont)], cont), rel=1e-5)
    with pytest.raises(lm.LMError, match=r"example 0: the continuation has \d+ tokens, more than the model's "
                                         r"context of 3"):
        lm.completion_loss(model, tok, ["a"], [" the film was great and the plot"], max_length=3)


@pytest.mark.parametrize("choices, labels, match", [
    ("positive,negative", [0], r"choices: expected a list of examples' choices, got str"),
    (["positive"], [0], r"choices\[0\]: expected a list of choices \(strings\), got str"),
    ([[]], [0], r"choices\[0\]: the list of choices is empty"),
    ([["yes", ""]], [0], r"choices\[0\]: every choice must be a non-empty string"),
    ([["yes", "no"]], [2], r"labels\[0\]: expected a choice index in 0..1, got 2"),
])
def test_bad_choices_are_one_line_errors(model, tok, choices, labels, match):
    n = len(choices) if isinstance(choices, list) else 1
    with pytest.raises(lm.LMError, match=match) as e:
        lm.multiple_choice(model, tok, ["p"] * n, choices, labels)
    assert "\n" not in str(e.value)


def test_empty_completions_and_texts_are_refused(model, tok):
    with pytest.raises(lm.LMError, match=r"completions\[1\]: empty after tokenisation"):
        lm.completion_loss(model, tok, ["a", "b"], [" plot", ""])
    with pytest.raises(lm.LMError, match=r"texts\[0\]: empty after tokenisation"):
        lm.text_loss(model, tok, [""])
    with pytest.raises(lm.LMError, match="no scored tokens"):
        lm.corpus_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long))
