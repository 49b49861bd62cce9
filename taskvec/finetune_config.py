"""The fine-tuning configuration: :class:`FinetuneConfig`, its fields' types, ranges and help texts (the
``taskvec finetune`` flags are generated from them). Re-exported by :mod:`taskvec.finetune`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import TaskvecError
from .io import check_value
from .lm_objective import check_objective


class ConfigError(TaskvecError, ValueError):
    """A :class:`FinetuneConfig` field of the wrong type or out of range; the message names the field."""


def _opt(default, *, help: str, **meta):
    """A :class:`FinetuneConfig` field with an immutable default and its help text (``metadata["help"]``,
    shown by ``taskvec finetune --help``); ``choices`` (valid values) and ``flags`` (extra CLI spellings) go
    to the metadata too."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (saved in ``run.json``).

    Units: ``lr`` per optimiser step; ``eval_every`` and ``max_steps`` in optimiser steps; ``max_length`` in
    tokens. ``early_stopping`` is a list of rule names (stop at the first that fires; ``[]`` = run to
    ``max_steps``); ``rule_args`` maps a rule name to its keyword arguments. Every field's ``metadata["help"]``
    describes it; the ``taskvec finetune`` flags are generated from these fields (``--field-name``).
    """

    scope: str = _opt("qkv", help="trained parameters: full | attention | qkv | q | v | qv | ... | lora | re:<regex>")
    head: str = _opt("auto", help="task head (auto: probe for encoders, label_words for decoders)",
                     choices=("auto", "probe", "label_words", "random"))
    objective: str = _opt("auto", help="classify (a class head), lm (LM loss of the texts) or choice (LM loss of "
                                       "the true label word after the prompt); auto: the task's own",
                          choices=("auto", "classify", "lm", "choice"))
    train_head: bool = _opt(False, help="also train the task head (frozen otherwise)")
    optimizer: str = _opt("adamw", help="optimiser", choices=("adamw", "sgd"))
    lr: float = _opt(2e-4, help="learning rate (per optimiser step)")
    weight_decay: float = _opt(0.0, help="weight decay (never on biases, norms or partially trained tensors)")
    momentum: float = _opt(0.0, help="SGD momentum")
    batch_size: int = _opt(16, help="training batch size")
    max_steps: int = _opt(300, help="optimiser steps at most")
    warmup_steps: int = _opt(0, help="linear warm-up steps")
    schedule: str = _opt("constant", help="learning rate after warm-up (linear: decays to 0 at max_steps)",
                         choices=("constant", "linear"))
    grad_clip: float | None = _opt(1.0, help="gradient-norm clipping threshold (none: no clipping)")
    loss: str = _opt("ce", help="cross-entropy, or squared error on one-hot targets", choices=("ce", "mse"))
    eval_every: int = _opt(50, help="evaluation interval (steps)")
    early_stopping: list[str] = field(default_factory=lambda: ["patience"], metadata={
        "help": "stopping rules, the first that fires stops: patience, spectral (comma- or space-separated; "
                "none: run to max_steps)", "metavar": "RULE"})
    patience: int = _opt(2, help="patience rule: evaluations without improvement before stopping")
    min_delta: float = _opt(0.0, help="patience rule: smallest change of metric that counts as an improvement")
    metric: str = _opt("val_loss", help="metric of the patience rule and of the kept (best) checkpoint",
                       choices=("val_loss", "val_accuracy"))
    rule_args: dict = field(default_factory=dict, metadata={
        "help": "keyword arguments of the stopping rules, {rule: {key: value}}"})
    max_length: int = _opt(128, help="tokens per example at most")
    eval_batch_size: int = _opt(64, help="evaluation batch size")
    seed: int = _opt(0, help="seed of the splits, shuffling, probe, label noise and initialisation")
    max_train: int | None = _opt(2000, help="cap on training examples per task (none: no cap)")
    test_size: int = _opt(1000, help="test examples at most (and at most 20% of the task)")
    val_size: int = _opt(500, help="validation examples at most (and at most 10% of the task)")
    probe_C: float = _opt(1.0, help="inverse regularisation strength of the logistic-regression probe head",
                          flags=("--probe-c",))
    lora_r: int = _opt(8, help="LoRA rank")
    lora_alpha: float = _opt(16.0, help="LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with rsLoRA)")
    lora_dropout: float = _opt(0.0, help="LoRA dropout")
    lora_targets: list[str] | None = field(default=None, metadata={
        "help": "LoRA target module names (none: Q and V)", "metavar": "MODULE"})
    use_rslora: bool = _opt(False, help="rank-stabilised LoRA scaling", flags=("--rslora",))
    device: str | None = _opt(None, help="cpu, cuda, ... (none: accelerate's choice)")
    attn_implementation: str = _opt("sdpa", help="transformers attention kernel: sdpa, eager, ... (the spectral "
                                                 "rule forces eager)")
    label_noise: float = _opt(0.0, help="share of train and validation labels flipped (test stays clean)")
    test_curve: bool = _opt(False, help="also evaluate the test split at every evaluation (logged, never used "
                                        "to stop)")
    eval_steps: list[int] = field(default_factory=list, metadata={
        "help": "extra evaluation steps besides every eval_every", "metavar": "STEP"})

    def __post_init__(self):
        from .scopes import check_scope

        if isinstance(self.early_stopping, str):
            self.early_stopping = [r for r in self.early_stopping.split(",") if r and r != "none"]
        self._check_types()
        check_scope(self.scope)  # a bad scope fails here, before any output exists
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.loss not in ("ce", "mse"):
            raise ConfigError(f"loss must be 'ce' or 'mse', got {self.loss!r}")
        check_objective(self.objective, self.early_stopping)
        if self.head not in ("auto", "probe", "label_words", "random"):
            raise ConfigError(f"head must be auto, probe, label_words or random, got {self.head!r}")
        if self.schedule not in ("constant", "linear"):
            raise ConfigError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}")
        for k in ("batch_size", "max_steps", "eval_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("lr", "weight_decay", "momentum", "warmup_steps", "lora_dropout"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if any(not isinstance(v, dict) for v in self.rule_args.values()):
            raise ConfigError(f"rule_args: expected {{rule: {{key: value}}}}, got {self.rule_args!r}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ConfigError(f"label_noise must be in [0, 1), got {self.label_noise}")
        self.eval_steps = sorted({int(k) for k in (self.eval_steps or [])})
        if any(k < 1 for k in self.eval_steps):
            raise ConfigError(f"eval_steps must be >= 1, got {self.eval_steps}")

    def _check_types(self) -> None:
        """Every field against its annotation (configs read from YAML arrive untyped); a float given as a
        numeric string (YAML reads ``1e-3`` as one) is converted. Raises :class:`ConfigError` naming the field."""
        import typing

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            try:
                setattr(self, f.name, check_value(f.name, getattr(self, f.name), hints[f.name]))
            except TaskvecError as e:
                raise ConfigError(str(e)) from None

    def lr_at(self, step: int) -> float:
        """Learning rate at 0-based optimiser step ``step``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "linear":
            rest = max(1, self.max_steps - self.warmup_steps)
            return self.lr * max(0.0, 1.0 - (step - self.warmup_steps) / rest)
        return self.lr
