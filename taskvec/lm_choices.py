"""Multiple-choice accuracy of a run's ``choice`` tasks, predicted from per-choice log-likelihoods and measured.

A ``choice`` task (:mod:`taskvec.lm_objective`) is scored as lm-evaluation-harness ``multiple_choice``: each
label word's continuation ``" " + word`` after the task's prompt gets its summed log-likelihood ℓ_ic, ``acc``
is the share of examples whose true choice has the largest ℓ_ic and ``acc_norm`` the same with ℓ_ic divided
by the word's length in characters (:func:`taskvec.lm_metrics.choice_predictions`). The prediction of a merge
takes every choice's ℓ_ic from the linearised next-token logits (:func:`taskvec.lm_predict.lm_expansions`, the
second-order logits along the merge direction) and the argmax of those: the accuracy of the linearised model.

Shapes: ``n`` examples, ``C`` choices; scores ``(n, C)`` float64 nats; accuracies 0–1.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from .lm_metrics import accuracy_of, choice_predictions
from .lm_objective import LMBatches
from .lm_predict import lm_expansions, measured_logliks


def choice_batches(tokenizer, task, indices, batch_size: int = 16, max_length: int = 128) -> list[LMBatches]:
    """One :class:`~taskvec.lm_objective.LMBatches` per choice of ``task`` (its label words), the examples of
    ``indices`` in the same order in each (no length sorting, so rows line up across choices)."""
    out = []
    lm_log = logging.getLogger("taskvec.lm_objective")
    level = lm_log.level
    for c in range(task.num_labels):
        as_c = copy.copy(task)  # the task with every example's label set to choice c (not re-validated)
        as_c.labels = [c] * len(task.texts)
        if c:
            lm_log.setLevel(logging.ERROR)  # the truncation warning was given for the first choice
        try:
            out.append(LMBatches(tokenizer, as_c, indices, "choice", batch_size=batch_size, max_length=max_length))
        finally:
            lm_log.setLevel(level)
    return out


def choice_chars(task) -> list[int]:
    """Length in characters of each choice's continuation word (the ``acc_norm`` divisor), as the harness
    counts it (without the delimiter)."""
    words = task.label_words or task.label_names
    return [len(w) for w in words]


def accuracies(scores: torch.Tensor, labels, chars: list[int]) -> dict:
    """``{"acc", "acc_norm"}`` of ``(n, C)`` choice scores against the ``(n,)`` labels."""
    pred, pred_norm = choice_predictions(list(scores), [chars] * scores.shape[0])
    labels = [int(y) for y in labels]
    return {"acc": accuracy_of(pred, labels), "acc_norm": accuracy_of(pred_norm, labels)}


@dataclasses.dataclass
class ChoiceScores:
    """Per-choice log-likelihoods of one task's examples.

    Attributes:
        f0: ``(n, C)`` at θ0 (nats).
        predicted: ``{combination: (n, C)}`` from the linearised logits (nats).
        labels: ``(n,)`` true choices.
        chars: ``(C,)`` choice lengths in characters.
    """

    f0: torch.Tensor
    predicted: dict
    labels: torch.Tensor
    chars: list[int]

    def accuracy(self, combination: str | None = None) -> dict:
        """``acc``/``acc_norm`` at θ0 (``None``) or predicted for a combination."""
        return accuracies(self.f0 if combination is None else self.predicted[combination], self.labels, self.chars)


def predict_choices(model, batches: list[LMBatches], labels, chars: list[int], directions, combinations,
                    second_order, max_memory=None, device=None) -> ChoiceScores:
    """:class:`ChoiceScores` for the combinations: one :func:`~taskvec.lm_predict.lm_expansions` per choice
    (C times the cost of the true choice's predictions), no remainders."""
    f0s, preds = [], {c: [] for c in combinations}
    for b in batches:
        der, pred = lm_expansions(model, b, directions, combinations, second_order, [], max_memory, device)
        f0s.append(der.f0)
        for c in combinations:  # a diverging series (ρ ≥ 1) truncated at its first order
            preds[c].append(pred.predicted[c] if pred.curvature[c] < 1 else pred.predicted_1st[c])
    return ChoiceScores(torch.stack(f0s, 1), {c: torch.stack(v, 1) for c, v in preds.items()},
                        torch.as_tensor(labels), chars)


def measure_choices(model, batches: list[LMBatches], device=None) -> torch.Tensor:
    """``(n, C)`` per-choice log-likelihoods of ``model`` as it is (e.g. with a merge applied)."""
    return torch.stack([measured_logliks(model, b, device) for b in batches], 1)


__all__ = ["ChoiceScores", "accuracies", "choice_batches", "choice_chars", "measure_choices",
           "predict_choices"]


class ChoiceCheck:
    """The multiple-choice part of :func:`taskvec.lm_validate.validate_lm_run`: for every ``choice`` task of a
    run, per-choice batches of the evaluation and held-out examples, predicted scores for the merges'
    combinations and the accuracies measured on each merged model (``acc``, in points 0–100 in the rows)."""

    def __init__(self, tokenizer, tasks: dict, eval_idx: dict, holdout_idx: dict, batch_size: int,
                 max_length: dict):
        self.tasks = dict(tasks)  # the tasks scored as multiple choice (objective ``choice``)
        self.chars = {s: choice_chars(t) for s, t in self.tasks.items()}
        self.labels = {s: ([t.labels[i] for i in eval_idx[s]], [t.labels[i] for i in holdout_idx[s]])
                       for s, t in self.tasks.items()}
        self.batches = {s: (choice_batches(tokenizer, t, eval_idx[s], batch_size, max_length[s]),
                            choice_batches(tokenizer, t, holdout_idx[s], batch_size, max_length[s]))
                        for s, t in self.tasks.items()}
        self.scores: dict[str, ChoiceScores] = {}
        self.base_heldout: dict[str, dict] = {}

    def predict(self, models, directions, combinations, second_order, max_memory=None, device=None) -> None:
        for s in self.tasks:
            self.scores[s] = predict_choices(models[s], self.batches[s][0], self.labels[s][0], self.chars[s],
                                             directions, combinations, second_order, max_memory, device)
            ho = measure_choices(models[s], self.batches[s][1], device)
            self.base_heldout[s] = accuracies(ho, self.labels[s][1], self.chars[s])

    def measure(self, models, device=None) -> dict:
        """``{task: (eval accuracies, held-out accuracies)}`` of the models as they are."""
        return {s: tuple(accuracies(measure_choices(models[s], self.batches[s][k], device), self.labels[s][k],
                                    self.chars[s]) for k in (0, 1)) for s in self.tasks}

    def fields(self, s: str, combination: str, measured: tuple) -> dict:
        """The row fields of task ``s`` for one merge: base, predicted and measured ``acc`` / ``acc_norm``
        (points) on the evaluation examples, measured on the held-out ones."""
        if s not in self.tasks:
            return {}
        sc = self.scores[s]
        base, pred = sc.accuracy(), sc.accuracy(combination)
        out = {}
        for k in ("acc", "acc_norm"):
            out[f"{k}_base"], out[f"{k}_predicted"] = 100 * base[k], 100 * pred[k]
            out[f"{k}_measured"], out[f"{k}_measured_heldout"] = 100 * measured[0][k], 100 * measured[1][k]
            out[f"{k}_base_heldout"] = 100 * self.base_heldout[s][k]
        return out


def choice_summary(rows: list[dict]) -> dict | None:
    """Predicted vs measured ``acc`` changes (points) over the rows of choice tasks: Spearman and mean absolute
    error on the evaluation examples; on the held-out ones against their own base. ``None`` without such rows."""
    from .validation.summary import spearman

    rows = [r for r in rows if "acc_predicted" in r]
    if not rows:
        return None
    pred = [r["acc_predicted"] - r["acc_base"] for r in rows]
    out = {"n": len(rows)}
    for where, key, base in (("eval", "acc_measured", "acc_base"), ("heldout", "acc_measured_heldout",
                                                                     "acc_base_heldout")):
        meas = [r[key] - r[base] for r in rows]
        out[where] = {"spearman": spearman(pred, meas),
                      "mae_points": float(sum(abs(a - b) for a, b in zip(pred, meas)) / len(rows)),
                      "mae_no_change": float(sum(abs(b) for b in meas) / len(rows))}
    return out
