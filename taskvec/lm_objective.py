"""The causal-LM fine-tuning objective: tasks as (context, continuation) token pairs, the LM head, batches
and the token loss used by :func:`taskvec.finetune` when a task's objective is ``lm`` or ``choice``.

Objectives (``FinetuneConfig.objective``; ``auto`` takes the task's own :attr:`taskvec.tasks.Task.objective`):

``classify``  a classification head (probe / label words / random) and cross-entropy over classes (the default)
``lm``        language modelling of the task's texts: every token of a text scored, the first given the prefix
              token (lm-evaluation-harness ``loglikelihood_rolling`` of a text that fits; longer texts are cut
              to ``max_length`` tokens and counted in ``log.json``)
``choice``    a classification task cast as multiple choice over its label words: the continuation is
              ``" " + label word`` of the true class after the task's prompt (harness ``multiple_choice``);
              the loss is on those continuation tokens only

Both LM objectives use the model's own LM head (:class:`LMHead`: the tied input embedding, or a frozen copy
of an untied ``lm_head``) over every position, so a task model's output is ``(B, L, V)`` next-token logits
and its labels ``(B, L)`` next-token ids with ``-100`` off the continuation. Losses are mean token NLL in
nats; evaluation aggregates Σ NLL / Σ tokens (:func:`taskvec.lm_metrics.corpus_loss`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TaskvecError
from .lm_metrics import DELIMITER, build_batch, encode, encode_pair, prefix_token_id
from .tasks import EpochBatches

log = logging.getLogger(__name__)

OBJECTIVES = ("classify", "lm", "choice")
IGNORE = -100


class LMHead(nn.Module):
    """Next-token logits ``(B, L, V)`` from hidden states ``(B, L, H)``: the backbone's input embedding when
    tied (read at every call, no parameters), else a frozen copy of the LM head's weight ``(V, H)``."""

    def __init__(self, weight: torch.Tensor | None = None, tied: bool = True):
        super().__init__()
        self.tied = tied
        self.register_buffer("weight", None if tied else weight.detach().clone(), persistent=not tied)

    def forward(self, hidden: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        w = backbone.get_input_embeddings().weight if self.tied else self.weight
        return hidden @ w.T.to(hidden.dtype)


class ObjectiveError(TaskvecError, ValueError):
    """An objective that does not fit the task, the model or the stopping rules."""


def check_objective(objective: str, early_stopping=()) -> None:
    """``FinetuneConfig.objective`` is ``auto`` or one of :data:`OBJECTIVES`; the spectral rule (a kernel
    of class logits) is refused with an LM objective."""
    if objective != "auto" and objective not in OBJECTIVES:
        raise ObjectiveError(f"objective must be auto, {', '.join(OBJECTIVES)}; got {objective!r}")
    if objective in ("lm", "choice") and "spectral" in early_stopping:
        raise ObjectiveError(f"the spectral rule needs a classification objective; use patience with objective "
                             f"{objective!r}")


def resolve_objective(config_objective: str, task, early_stopping=()) -> str:
    """The objective of ``task`` under ``FinetuneConfig.objective`` (``auto`` = the task's own
    ``Task.objective``), checked as :func:`check_objective`."""
    obj = getattr(task, "objective", "classify") if config_objective == "auto" else config_objective
    if obj not in OBJECTIVES:
        raise ObjectiveError(f"task {task.name!r}: objective must be one of {', '.join(OBJECTIVES)}, got {obj!r}")
    try:
        check_objective(obj, early_stopping)
    except ObjectiveError as e:
        raise ObjectiveError(f"task {task.name!r}: {e}") from None
    return obj


def lm_batches(base, tokenizer, task, noisy, splits, config, objective: str):
    """``(train, val or None, test)`` :class:`LMBatches` of a task's splits for fine-tuning: ``noisy`` (the
    task with flipped train/validation labels) for train and validation, the clean ``task`` for test.
    Refuses a ``base`` that is not a decoder LM."""
    from transformers import AutoConfig

    from .modeling import is_decoder, resolve_model

    if not is_decoder(AutoConfig.from_pretrained(resolve_model(base))):
        raise ObjectiveError(f"task {task.name!r}: objective {objective!r} needs a decoder LM (an encoder has no LM "
                             "head); use objective='classify'")
    mk = {"objective": objective, "max_length": config.max_length}
    ev = dict(mk, sort_by_length=True)
    train = LMBatches(tokenizer, noisy, splits.train, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                      **mk)
    val = LMBatches(tokenizer, noisy, splits.val, batch_size=config.eval_batch_size, **ev) if splits.val else None
    test = LMBatches(tokenizer, task, splits.test, batch_size=config.eval_batch_size, **ev)
    return train, val, test


def task_pairs(tokenizer, task, indices, objective: str, max_length: int) -> tuple[list, int]:
    """``([(context ids, continuation ids)] for each index, number of examples cut to fit max_length)``.

    ``lm``: ``([prefix], text tokens)``, a text longer than ``max_length`` tokens keeps its first
    ``max_length``. ``choice``: :func:`~taskvec.lm_metrics.encode_pair` of the formatted prompt and
    ``" " + label word``; the prompt loses tokens from the left when the pair is too long (counted).
    """
    pairs, cut = [], 0
    if objective == "lm":
        prefix = prefix_token_id(tokenizer)
        for i in indices:
            toks = encode(tokenizer, task.texts[i])
            if not toks:
                raise TaskvecError(f"task {task.name!r}: text {i} is empty after tokenisation (nothing to score)")
            cut += len(toks) > max_length
            pairs.append(([prefix], toks[:max_length]))
        return pairs, cut
    if objective != "choice":
        raise TaskvecError(f"task_pairs: objective {objective!r} is not an LM objective (lm, choice)")
    if "{text}" not in task.prompt:
        raise TaskvecError(f"task {task.name!r}: prompt {task.prompt!r} does not name the text column ({{text}})")
    words = task.label_words or task.label_names
    for i in indices:
        b = task.texts_b[i] if task.texts_b else ""
        ctx, cont = encode_pair(tokenizer, task.prompt.format(text=task.texts[i], text_b=b),
                                DELIMITER + words[task.labels[i]])
        if not cont:
            raise TaskvecError(f"task {task.name!r}: label word {words[task.labels[i]]!r} is empty after "
                               "tokenisation")
        if len(cont) > max_length:
            raise TaskvecError(f"task {task.name!r}: label word {words[task.labels[i]]!r} has {len(cont)} tokens, "
                               f"more than max_length {max_length}")
        if len(ctx) + len(cont) > max_length + 1:
            cut += 1
            ctx = ctx[len(ctx) + len(cont) - (max_length + 1):]
        pairs.append((ctx, cont))
    return pairs, cut


class LMBatches(EpochBatches):
    """Re-iterable LM batches of one task split, with the interface of :class:`taskvec.tasks.Batches`.

    Each batch: ``input_ids`` / ``attention_mask`` ``(B, L)`` (right-padded; ``L`` ≤ ``max_length``) and
    ``labels`` ``(B, L)``: the next token at each position, ``-100`` off the continuation. ``labels``
    (attribute) holds the examples' class labels, in the order of ``indices``. ``shuffle`` re-shuffles every
    epoch with ``seed + epoch``; ``sort_by_length`` (evaluation) orders examples by length.
    """

    def __init__(self, tokenizer, task, indices, objective: str, batch_size: int = 32, max_length: int = 128,
                 shuffle: bool = False, seed: int = 0, sort_by_length: bool = False):
        self.task, self.indices, self.objective = task, list(indices), objective
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.sort_by_length = sort_by_length and not shuffle
        self.pairs, self.truncated = task_pairs(tokenizer, task, self.indices, objective, max_length)
        if self.truncated:
            log.warning("task %s: %d of %d examples longer than max_length=%d tokens were cut (%s)", task.name,
                        self.truncated, len(self.indices), max_length,
                        "texts keep their first tokens" if objective == "lm" else "prompts lose their first tokens")
        self.pad_id = next((int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.max_length = max_length
        self.labels = torch.tensor([task.labels[i] for i in self.indices], dtype=torch.long)

    def _length(self, j: int) -> int:
        return len(self.pairs[j][0]) + len(self.pairs[j][1])

    def batch(self, positions) -> dict:
        b = build_batch([self.pairs[j] for j in positions], self.pad_id, self.max_length, "right")
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels()}



def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL (nats) over the batch's scored tokens: logits ``(B, L, V)``, labels ``(B, L)``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def token_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scored token: ``(NLL (M,) nats, correct top-1 (M,) bool, ones (M,))`` for Σ/Σ aggregation."""
    keep = labels != IGNORE
    lg, y = logits[keep].float(), labels[keep]
    nll = F.cross_entropy(lg, y, reduction="none")
    return nll, lg.argmax(-1) == y, torch.ones_like(nll)


def make_lm_model(backbone: nn.Module, task, base=None):
    """A :class:`~taskvec.modeling.TaskModel` whose head is the LM head (``HeadSpec.kind="lm"``, pooling
    ``none``): outputs ``(B, L, V)`` next-token logits."""
    from .modeling import HeadSpec, TaskModel, quiet_transformers, resolve_model

    tied = bool(getattr(backbone.config, "tie_word_embeddings", False))
    weight = None
    if not tied:
        if base is None:
            raise TaskvecError("an untied decoder needs its base model to copy the LM head from")
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            lm = AutoModelForCausalLM.from_pretrained(resolve_model(base))
        weight = lm.get_output_embeddings().weight.detach().clone()
        del lm
    spec = HeadSpec("lm", "none", task.num_labels, task.label_names, list(task.label_words or []), [],
                    task.prompt, tied, task.name)
    return TaskModel(backbone, LMHead(weight, tied), spec)
