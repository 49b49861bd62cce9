"""Early-stopping rules behind one small interface.

The fine-tuning loop (:mod:`taskvec.finetune`) calls every active rule

* once with :meth:`StoppingRule.start` before the first step, handing it a :class:`TrainContext` (model,
  training batches, step-size schedule) so that data-dependent rules (the spectral rule of
  :mod:`taskvec.spectral`) can compute what they need at θ0;
* after every optimiser step with :meth:`StoppingRule.update`, passing the evaluation metrics when that
  step was an evaluation step (else ``None``). Evaluations happen every ``eval_every`` steps, at the
  configured ``eval_steps``, and at the steps a rule asks for with :meth:`StoppingRule.eval_steps`.

A rule answers ``None`` (go on) or a :class:`StopDecision`. The loop stops at the first decision of any
rule, restores the best checkpoint by validation metric when it has one (or the state at the decided
step otherwise), and logs every rule's :meth:`summary`. Rules keep their state in plain dicts for
resumable runs. New rules register with :func:`register_rule`; the loop never changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StopDecision:
    """Why and where to stop. ``restore_step`` is the step whose weights to keep (None: the best by
    validation metric if the loop tracked one, else the current weights)."""

    reason: str
    step: int
    restore_step: int | None = None


@dataclass
class TrainContext:
    """What a rule may look at before training starts.

    Attributes:
        model: the :class:`~taskvec.modeling.TaskModel` at θ0 (do not modify it).
        selections: the trained parameter selections (:func:`taskvec.scopes.resolve_scope`).
        train_batches: a callable returning an iterator over tokenised training batches (dicts with
            ``input_ids``, ``attention_mask``, ``labels``), in a fixed order, unshuffled.
        num_train: number of training examples n.
        num_labels: number of classes o.
        lr_at: step -> learning rate used by the optimiser at that step (0-based).
        max_steps: the step budget.
        optimizer: ``"sgd"`` or ``"adamw"``.
        batch_size: per-step batch size.
        loss: ``"ce"`` (cross-entropy) or ``"mse"`` (squared loss on one-hot targets).
        device: torch device of the model.
    """

    model: Any
    selections: list
    train_batches: Callable
    num_train: int
    num_labels: int
    lr_at: Callable[[int], float]
    max_steps: int
    optimizer: str = "adamw"
    batch_size: int = 16
    loss: str = "ce"
    device: Any = "cpu"
    extra: dict = field(default_factory=dict)


class StoppingRule:
    """Base class: subclasses set ``name`` and override what they need."""

    name = "rule"

    def start(self, ctx: TrainContext) -> None:
        """Called once before the first optimiser step."""

    def update(self, step: int, metrics: dict | None) -> StopDecision | None:
        """Called after optimiser step ``step`` (1-based count of steps done); ``metrics`` at evaluations."""
        return None

    def eval_steps(self) -> list[int]:
        """Steps (after :meth:`start`) at which the rule wants an evaluation besides the regular ones, e.g. its
        own predicted stopping step, so that the learning curve has a measured point there."""
        return []

    def summary(self) -> dict:
        """JSON-serialisable summary written to the run's log."""
        return {"rule": self.name}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Patience(StoppingRule):
    """Stop when the validation metric has not improved by ``min_delta`` for ``patience`` evaluations.

    ``metric`` is a key of the evaluation metrics (``val_accuracy`` or ``val_loss``); ``mode`` is ``max``
    or ``min``. The weights kept are those of the best evaluation.
    """

    name = "patience"

    def __init__(self, patience: int = 3, min_delta: float = 0.0, metric: str = "val_loss", mode: str = "min"):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.min_delta, self.metric, self.mode = patience, float(min_delta), metric, mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step = 0
        self.bad = 0

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, step, metrics):
        if metrics is None or self.metric not in metrics:
            return None
        v = float(metrics[self.metric])
        if self._improved(v):
            self.best, self.best_step, self.bad = v, step, 0
            return None
        self.bad += 1
        if self.bad >= self.patience:
            return StopDecision(f"patience: no {self.metric} improvement > {self.min_delta} in "
                                f"{self.patience} evaluations (best {self.best:.4f} at step {self.best_step})",
                                step, self.best_step)
        return None

    def summary(self):
        return {"rule": self.name, "metric": self.metric, "mode": self.mode, "patience": self.patience,
                "min_delta": self.min_delta, "best": self.best if math.isfinite(self.best) else None,
                "best_step": self.best_step}

    def state_dict(self):
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state):
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]


_RULES: dict[str, Callable[..., StoppingRule] | str] = {
    "patience": Patience,
    # registered lazily so that importing taskvec does not import the kernel code
    "spectral": "taskvec.spectral:SpectralStopping",
}


def register_rule(name: str, factory: Callable[..., StoppingRule]) -> None:
    """Make a rule available by name (CLI ``--early-stopping NAME``)."""
    _RULES[name] = factory


def rule_names() -> list[str]:
    return sorted(_RULES) + ["none"]


def make_rule(name: str, **kwargs) -> StoppingRule:
    """Build a registered rule; unknown names list the valid ones."""
    if name not in _RULES:
        raise ValueError(f"unknown early-stopping rule {name!r}; valid: {', '.join(rule_names())}")
    f = _RULES[name]
    if isinstance(f, str):
        import importlib

        mod, attr = f.split(":")
        f = getattr(importlib.import_module(mod), attr)
    return f(**kwargs)
