"""Causal-LM metrics with lm-evaluation-harness conventions: multiple choice (``acc``, ``acc_norm``) and
language-model loss (mean token NLL, perplexity) of texts and of completions.

Conventions (lm-evaluation-harness ``TemplateLM``/``HFLM``; ../shared/THEORY.md):

* **Tokenisation of a (context, continuation) pair** (:func:`encode_pair`): trailing spaces of the
  context move to the front of the continuation, then ``context + continuation`` is encoded as a whole
  and split at the length of the encoded context, so the continuation's tokens are the ones the model
  sees in the joint text. An empty context is replaced by the prefix token (BOS, else EOS). Tokens are
  encoded without special tokens.
* **Multiple choice** (:func:`multiple_choice`): the continuation of choice ``c`` is ``delimiter + c``
  (``" "``); its score is the summed log-probability of the continuation's tokens given the prompt (nats,
  ≤ 0). ``acc``: the argmax score is the label; ``acc_norm``: the argmax of score / ``len(c)`` (the choice's
  length in characters, without the delimiter). Ties go to the first choice (``numpy.argmax``).
* **LM loss** of a text (:func:`text_loss`): every token is scored, the first given the prefix token;
  texts longer than the context are scored in the harness's rolling windows (disjoint predictions, each
  window conditioned on the tokens before it), so nothing is dropped. Of a completion
  (:func:`completion_loss`): the completion's tokens only, given the prompt. Corpus figures are
  ``mean_nll = Σ NLL / Σ tokens`` (nats per token) and ``perplexity = exp(mean_nll)``, not a mean of
  per-example perplexities.
* **Too long**: a (context, continuation) pair longer than ``max_length + 1`` tokens loses context tokens
  from the left (``LMBatch.truncated`` counts them and the results report it); a continuation that alone
  exceeds ``max_length`` is refused.

Shapes: ``N`` scored sequences of (padded) length ``L``, vocabulary ``V``. Log-probabilities are computed
in float32 from float32 logits and summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import TaskvecError

#: what lm-evaluation-harness puts between a prompt and each choice (``target_delimiter``)
DELIMITER = " "


class LMError(TaskvecError, ValueError):
    """Bad input for an LM metric (one line naming the example, the key and what was expected)."""


# --- tokenisation ----------------------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the harness's ``tok_encode`` for causal LMs)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prefix_token_id(tokenizer) -> int:
    """The token that conditions an empty context: BOS when the tokenizer has one, else EOS."""
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    raise LMError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` as lm-evaluation-harness's ``_encode_pair``: trailing spaces of
    the context move to the continuation; the whole is encoded and split at the encoded context's length.
    An empty context becomes ``[prefix token]`` and the continuation is encoded alone."""
    if context == "":
        return [prefix_token_id(tokenizer)], encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    n_ctx = len(encode(tokenizer, context))
    return whole[:n_ctx], whole[n_ctx:]


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` pairs that score every token of ``tokens`` exactly once, each pair at most
    ``max_length + 1`` tokens long (lm-evaluation-harness ``get_rolling_token_windows`` with
    ``context_len=1`` followed by ``make_disjoint_window``): the first window is conditioned on ``prefix``,
    each later one on the ``max_length − len(continuation)`` tokens before it."""
    if max_length < 1:
        raise LMError(f"max_length must be at least 1, got {max_length}")
    out, done = [], 0
    first = min(max_length, len(tokens))
    if first:
        out.append(([prefix], tokens[:first]))
        done = first
    while done < len(tokens):
        k = min(len(tokens) - done, max_length)
        end = done + k
        window = tokens[max(end - max_length - 1, 0):end - 1]  # inputs of this window
        ctx = window[:len(window) - (k - 1)]
        out.append((ctx, tokens[end - k:end]))
        done = end
    return out


# --- batches ---------------------------------------------------------------------------------------------


@dataclass
class LMBatch:
    """Padded inputs and targets of ``N`` (context, continuation) pairs.

    Attributes:
        input_ids: ``(N, L)`` long: ``(context + continuation)[:-1]``, padded with ``pad_id``.
        attention_mask: ``(N, L)`` long, 1 on real tokens.
        position_ids: ``(N, L)`` long, 0 at each sequence's first real token (so left padding is harmless).
        target_ids: ``(N, L)`` long: ``(context + continuation)[1:]`` (the next token at each position).
        target_mask: ``(N, L)`` bool, true at the positions whose next token belongs to the continuation.
        truncated: ``(N,)`` long, context tokens dropped from the left to fit ``max_length`` (0 mostly).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    truncated: torch.Tensor

    def to(self, device) -> LMBatch:
        return LMBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def labels(self) -> torch.Tensor:
        """``(N, L)`` next-token targets with -100 off the continuation (``cross_entropy(ignore_index=-100)``)."""
        return self.target_ids.masked_fill(~self.target_mask, -100)


def build_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, max_length: int | None = None,
                padding_side: str = "right") -> LMBatch:
    """An :class:`LMBatch` from ``(context ids, continuation ids)`` pairs.

    A pair longer than ``max_length + 1`` tokens keeps its last ``max_length + 1`` (context dropped from
    the left, counted in ``truncated``); a continuation longer than ``max_length`` or empty is refused, as is
    an empty context (use :func:`encode_pair`, which conditions on the prefix token).
    """
    if padding_side not in ("left", "right"):
        raise LMError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not pairs:
        raise LMError("no (context, continuation) pairs to score")
    seqs, conts, cut = [], [], []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise LMError(f"example {i}: the continuation is empty after tokenisation (nothing to score)")
        if not ctx:
            raise LMError(f"example {i}: empty context; condition it on the prefix token (encode_pair)")
        if max_length is not None and len(cont) > max_length:
            raise LMError(f"example {i}: the continuation has {len(cont)} tokens, more than the model's context "
                          f"of {max_length}; shorten it")
        seq = list(ctx) + list(cont)
        drop = 0 if max_length is None else max(len(seq) - (max_length + 1), 0)
        seqs.append(seq[drop:])
        conts.append(len(cont))
        cut.append(drop)
    L = max(len(s) for s in seqs) - 1
    N = len(seqs)
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    tgt = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros((N, L), dtype=torch.long)
    tmask = torch.zeros((N, L), dtype=torch.bool)
    for i, (s, c) in enumerate(zip(seqs, conts)):
        n = len(s) - 1
        at = slice(0, n) if padding_side == "right" else slice(L - n, L)
        ids[i, at] = torch.tensor(s[:-1])
        tgt[i, at] = torch.tensor(s[1:])
        mask[i, at] = 1
        end = at.stop
        tmask[i, end - c:end] = True
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    return LMBatch(ids, mask, pos, tgt, tmask, torch.tensor(cut, dtype=torch.long))


# --- pure functions over logits ---------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """``log p(target | prefix)`` at every position: logits ``(N, L, V)`` and targets ``(N, L)`` -> ``(N, L)``
    float32 nats (log-softmax over the vocabulary in float32)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


def continuation_logliks(token_lp: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ log p over each row's continuation (N,) float64 nats, its token count (N,) long)``."""
    m = target_mask.bool()
    return (token_lp.double() * m).sum(1), m.sum(1)


def choice_predictions(scores: list[torch.Tensor], choice_chars: list[list[int]]) -> tuple[list[int], list[int]]:
    """``(acc predictions, acc_norm predictions)``: per example, the argmax of its choices' summed
    log-likelihoods ``scores[i]`` ``(C_i,)`` and of score / length in characters (first choice on ties)."""
    pred, pred_norm = [], []
    for i, (s, n) in enumerate(zip(scores, choice_chars)):
        s = s.double()
        chars = torch.tensor(n, dtype=torch.float64)
        if (chars <= 0).any():
            raise LMError(f"example {i}: a choice of length 0 characters cannot be length-normalised")
        pred.append(int(s.argmax()))
        pred_norm.append(int((s / chars).argmax()))
    return pred, pred_norm


def accuracy_of(pred: list[int], labels: list[int]) -> float:
    """Fraction of predictions equal to the labels (0–1)."""
    return sum(int(p == y) for p, y in zip(pred, labels)) / max(len(labels), 1)


def corpus_loss(nll: torch.Tensor, n_tokens: torch.Tensor) -> tuple[float, float]:
    """``(mean NLL = Σ nll / Σ tokens in nats per token, perplexity = exp(mean NLL))`` over the corpus."""
    total = int(n_tokens.sum())
    if total == 0:
        raise LMError("no scored tokens: the mean NLL of an empty corpus is undefined")
    mean = float(nll.double().sum()) / total
    return mean, math.exp(mean)


# --- models ----------------------------------------------------------------------------------------------


def lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits ``(N, L, V)`` of a causal LM: a ``*ForCausalLM`` (``.logits``), a taskvec LM task
    model (:func:`taskvec.lm_objective.make_lm_model`; it computes positions itself, so use right padding), or
    a base decoder (``LlamaModel`` as :func:`taskvec.modeling.load_backbone` loads it) whose tied input
    embedding is its LM head. A base model without tied embeddings has no LM head here and is refused."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    if isinstance(out, torch.Tensor) and out.dim() == 3:  # a taskvec LM task model (HeadSpec kind "lm")
        return out
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        raise LMError(f"{type(model).__name__} has no LM head (no .logits and untied embeddings): load it with "
                      "AutoModelForCausalLM for LM metrics")
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden @ model.get_input_embeddings().weight.T.to(hidden.dtype)


def _max_length(model, max_length: int | None) -> int:
    if max_length is not None:
        return int(max_length)
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if n is None:
        raise LMError(f"{type(model).__name__}: the context length is unknown; pass max_length")
    return int(n)


@dataclass
class PairScores:
    """Summed continuation log-likelihoods of ``N`` pairs: ``loglik`` ``(N,)`` float64 nats, ``n_tokens``
    ``(N,)``, ``truncated`` ``(N,)`` context tokens dropped to fit the model."""

    loglik: torch.Tensor
    n_tokens: torch.Tensor
    truncated: torch.Tensor


@torch.no_grad()
def score_pairs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8,
                max_length: int | None = None, padding_side: str = "right", device=None) -> PairScores:
    """Σ log p(continuation | context) of every pair with batched forward passes (eval mode for the call).
    Pairs are sorted by length within the call so that each batch is padded little; results are in the
    order given."""
    from .modelfn import eval_mode

    max_length = _max_length(model, max_length)
    dev = device if device is not None else next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    ll = torch.zeros(len(pairs), dtype=torch.float64)
    nt = torch.zeros(len(pairs), dtype=torch.long)
    cut = torch.zeros(len(pairs), dtype=torch.long)
    with eval_mode(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = build_batch([pairs[i] for i in idx], pad_id, max_length, padding_side).to(dev)
            lp = token_logprobs(lm_logits(model, b.input_ids, b.attention_mask, b.position_ids), b.target_ids)
            sums, counts = continuation_logliks(lp, b.target_mask)
            t = torch.tensor(idx)
            ll[t], nt[t], cut[t] = sums.cpu(), counts.cpu(), b.truncated.cpu()
    return PairScores(ll, nt, cut)


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if t is not None:
            return int(t)
    return 0


@dataclass
class MCResult:
    """Multiple-choice results: ``acc`` / ``acc_norm`` (0–1), per example ``scores`` (summed log-likelihood
    of each choice, nats), ``pred`` / ``pred_norm`` (chosen indices), ``truncated`` (examples whose prompt
    lost tokens to fit the model)."""

    acc: float
    acc_norm: float
    scores: list[torch.Tensor]
    pred: list[int]
    pred_norm: list[int]
    truncated: int = 0


def check_choices(choices, labels=None, where: str = "choices") -> None:
    """Each example's choices a non-empty list of non-empty strings, each label an index into them."""
    if not isinstance(choices, (list, tuple)):
        raise LMError(f"{where}: expected a list of examples' choices, got {type(choices).__name__}")
    for i, c in enumerate(choices):
        if not isinstance(c, (list, tuple)):
            raise LMError(f"{where}[{i}]: expected a list of choices (strings), got {type(c).__name__} {c!r:.60}")
        if len(c) == 0:
            raise LMError(f"{where}[{i}]: the list of choices is empty")
        bad = [x for x in c if not isinstance(x, str) or x == ""]
        if bad:
            raise LMError(f"{where}[{i}]: every choice must be a non-empty string, got {bad[0]!r}")
        if labels is not None:
            y = labels[i]
            if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < len(c):
                raise LMError(f"labels[{i}]: expected a choice index in 0..{len(c) - 1}, got {y!r}")


def multiple_choice(model, tokenizer, prompts: list[str], choices: list[list[str]], labels: list[int],
                    delimiter: str = DELIMITER, batch_size: int = 8, max_length: int | None = None,
                    padding_side: str = "right", device=None) -> MCResult:
    """``acc`` and ``acc_norm`` of a causal LM on multiple-choice examples (lm-evaluation-harness
    ``output_type: multiple_choice``); every (prompt, delimiter + choice) pair is one scored sequence."""
    check_choices(choices)
    if len(prompts) != len(choices) or len(prompts) != len(labels):
        raise LMError(f"prompts, choices and labels differ in length ({len(prompts)}, {len(choices)}, {len(labels)})")
    check_choices(choices, labels)
    pairs, owner = [], []
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        for c in cs:
            ctx, cont = encode_pair(tokenizer, p, delimiter + c)
            if not cont:
                raise LMError(f"choices[{i}]: choice {c!r} is empty after tokenisation")
            pairs.append((ctx, cont))
            owner.append(i)
    sc = score_pairs(model, pairs, _pad_id(tokenizer), batch_size, max_length, padding_side, device)
    scores, k = [], 0
    for cs in choices:
        scores.append(sc.loglik[k:k + len(cs)])
        k += len(cs)
    pred, pred_norm = choice_predictions(scores, [[len(c) for c in cs] for cs in choices])
    truncated = len({o for o, t in zip(owner, sc.truncated.tolist()) if t > 0})
    return MCResult(accuracy_of(pred, labels), accuracy_of(pred_norm, labels), scores, pred, pred_norm, truncated)


@dataclass
class LossResult:
    """LM loss of a corpus: per example ``nll`` ``(n,)`` float64 (nats, summed over its scored tokens) and
    ``n_tokens`` ``(n,)``; ``mean_nll`` = Σ nll / Σ tokens (nats per token), ``perplexity`` = exp(mean_nll);
    ``truncated``: examples whose prompt lost tokens to fit the model."""

    nll: torch.Tensor
    n_tokens: torch.Tensor
    mean_nll: float
    perplexity: float
    truncated: int = 0
    windows: int = field(default=0)


def text_loss(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int | None = None,
              padding_side: str = "right", device=None) -> LossResult:
    """Mean token NLL and perplexity of whole texts (harness ``loglikelihood_rolling``): every token scored,
    the first given the prefix token, long texts in rolling windows of ``max_length``."""
    if not isinstance(texts, (list, tuple)) or not texts:
        raise LMError("texts: expected a non-empty list of strings")
    max_length = _max_length(model, max_length)
    prefix = prefix_token_id(tokenizer)
    pairs, owner = [], []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise LMError(f"texts[{i}]: expected a string, got {type(t).__name__}")
        toks = encode(tokenizer, t)
        if not toks:
            raise LMError(f"texts[{i}]: empty after tokenisation (nothing to score)")
        for w in rolling_windows(toks, prefix, max_length):
            pairs.append(w)
            owner.append(i)
    sc = score_pairs(model, pairs, _pad_id(tokenizer), batch_size, max_length, padding_side, device)
    own = torch.tensor(owner)
    nll = torch.zeros(len(texts), dtype=torch.float64).index_add_(0, own, -sc.loglik)
    nt = torch.zeros(len(texts), dtype=torch.long).index_add_(0, own, sc.n_tokens)
    mean, ppl = corpus_loss(nll, nt)
    return LossResult(nll, nt, mean, ppl, 0, len(pairs))


def completion_loss(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 8,
                    max_length: int | None = None, padding_side: str = "right", device=None) -> LossResult:
    """Mean token NLL and perplexity of each completion given its prompt (completion tokens only)."""
    if len(prompts) != len(completions):
        raise LMError(f"prompts and completions differ in length ({len(prompts)} vs {len(completions)})")
    pairs = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not isinstance(p, str) or not isinstance(c, str):
            raise LMError(f"example {i}: prompt and completion must be strings")
        ctx, cont = encode_pair(tokenizer, p, c)
        if not cont:
            raise LMError(f"completions[{i}]: empty after tokenisation (nothing to score): {c!r:.60}")
        pairs.append((ctx, cont))
    sc = score_pairs(model, pairs, _pad_id(tokenizer), batch_size, max_length, padding_side, device)
    mean, ppl = corpus_loss(-sc.loglik, sc.n_tokens)
    return LossResult(-sc.loglik, sc.n_tokens, mean, ppl, int((sc.truncated > 0).sum()), len(pairs))
