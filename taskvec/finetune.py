"""Fine-tune one base model on several tasks with early stopping.

One task = one independent run from the same base weights and the same seed policy:

1. a head is built: a linear probe (logistic regression on frozen, pooled base features) for encoders,
   or label words read through the LM head for decoders (``head="label_words"``);
2. the scope's parameters train (``full``, ``attention``, ``qkv``, ``q``, ``qv``, ... or ``lora`` via peft) with
   AdamW or plain SGD, evaluated on the validation split every ``eval_every`` steps (plus ``eval_steps`` and
   the steps a rule asks for); ``test_curve`` also logs test metrics there (never shown to the rules), and
   ``label_noise`` flips a seeded share of the training and validation labels (:func:`flip_labels`);
3. stopping rules (:mod:`taskvec.stopping`; ``patience`` by default, ``spectral`` from the kernel theory)
   decide when to stop; the best validation checkpoint is kept;
4. the task model is written atomically as ``RUN/finetune/<task>/`` (``model/`` = ``save_pretrained`` backbone
   + tokenizer, ``head.*``, ``log.json`` = learning curve and stop reason, ``split.json`` = split indices;
   ``adapter/`` for LoRA).

The loop runs under ``accelerate`` (``accelerate launch`` / ``torchrun`` shard batches across processes) and
resumes an interrupted task from ``RUN/finetune/.<task>.ckpt/``. A non-finite loss stops the task, keeps the
last good weights, and says so in the log.
"""

from __future__ import annotations

import json
import random
import shutil
import sys as _sys
import time
import types as _types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TaskvecError
from .io import atomic_dir, check_output, write_json
from .modeling import (
    HeadSpec,
    LabelWordHead,
    LinearHead,
    TaskModel,
    extract_features,
    fit_probe,
    is_decoder,
    label_word_ids,
    load_backbone,
    load_tokenizer,
    resolve_model,
)
from .scopes import freeze_outside, lora_target_modules, partial_param_names, resolve_scope
from .stopping import StopDecision, TrainContext, make_rule
from .tasks import Batches, Splits, Task, load_task, make_splits, save_task


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (saved in ``run.json``).

    Units: ``lr`` per optimiser step; ``eval_every`` and ``max_steps`` in optimiser steps; ``max_length`` in
    tokens. ``early_stopping`` is a list of rule names (stop at the first that fires; ``[]`` = run to
    ``max_steps``); ``rule_args`` maps a rule name to its keyword arguments.
    """

    scope: str = "qkv"
    head: str = "auto"  # auto | probe | label_words | random
    train_head: bool = False
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-4
    weight_decay: float = 0.0
    momentum: float = 0.0
    batch_size: int = 16
    max_steps: int = 300
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear
    grad_clip: float | None = 1.0
    loss: str = "ce"  # ce | mse
    eval_every: int = 50
    early_stopping: list[str] = field(default_factory=lambda: ["patience"])
    patience: int = 2
    min_delta: float = 0.0
    metric: str = "val_loss"
    rule_args: dict = field(default_factory=dict)
    max_length: int = 128
    eval_batch_size: int = 64
    seed: int = 0
    max_train: int | None = 2000
    test_size: int = 1000
    val_size: int = 500
    probe_C: float = 1.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    use_rslora: bool = False
    device: str | None = None  # None: accelerate's choice
    attn_implementation: str = "sdpa"
    label_noise: float = 0.0  # share of train and validation labels flipped (test stays clean)
    test_curve: bool = False  # also evaluate the test split at every evaluation (logged, never used to stop)
    eval_steps: list[int] = field(default_factory=list)  # extra evaluation steps besides every eval_every

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.loss not in ("ce", "mse"):
            raise ValueError(f"loss must be 'ce' or 'mse', got {self.loss!r}")
        if self.head not in ("auto", "probe", "label_words", "random"):
            raise ValueError(f"head must be auto, probe, label_words or random, got {self.head!r}")
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}")
        for k in ("batch_size", "max_steps", "eval_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if isinstance(self.early_stopping, str):
            self.early_stopping = [r for r in self.early_stopping.split(",") if r and r != "none"]
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        self.eval_steps = sorted({int(k) for k in (self.eval_steps or [])})
        if any(k < 1 for k in self.eval_steps):
            raise ValueError(f"eval_steps must be >= 1, got {self.eval_steps}")

    def lr_at(self, step: int) -> float:
        """Learning rate at 0-based optimiser step ``step``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "linear":
            rest = max(1, self.max_steps - self.warmup_steps)
            return self.lr * max(0.0, 1.0 - (step - self.warmup_steps) / rest)
        return self.lr


@dataclass
class TaskResult:
    """Outcome of one task's fine-tuning (also in ``log.json``)."""

    task: str
    path: str
    stop_reason: str
    best_step: int
    steps: int
    probe_test_accuracy: float
    test_accuracy: float
    test_loss: float
    majority_accuracy: float
    wall_time_s: float
    curve: list[dict] = field(default_factory=list)
    rules: list[dict] = field(default_factory=list)


# --- evaluation -------------------------------------------------------------------------------------


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Mean loss over the batch: cross-entropy, or squared error ½‖f − onehot(y)‖² (``mse``)."""
    if kind == "ce":
        return F.cross_entropy(logits.float(), labels)
    onehot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return 0.5 * ((logits - onehot) ** 2).sum(-1).mean()


@torch.inference_mode()
def evaluate(model: TaskModel, batches, loss: str = "ce", accelerator=None, device=None) -> dict:
    """Accuracy and mean loss of ``model`` over tokenised batches (eval mode; restores the mode after).

    Returns ``{"accuracy", "loss", "n"}``. With an ``accelerator`` the batches are the process's shard and
    results are gathered.
    """
    was = model.training
    model.eval()
    correct, total, loss_sum = 0.0, 0, 0.0
    for b in batches:
        if device is not None:
            b = {k: v.to(device) for k, v in b.items()}
        logits = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        y = b["labels"]
        pred = logits.argmax(-1)
        per = (F.cross_entropy(logits.float(), y, reduction="none") if loss == "ce"
               else 0.5 * ((logits - F.one_hot(y, logits.shape[-1]).to(logits.dtype)) ** 2).sum(-1))
        if accelerator is not None:
            pred, y, per = accelerator.gather_for_metrics((pred, y, per))
        correct += float((pred == y).sum())
        total += int(y.numel())
        loss_sum += float(per.sum())
    model.train(was)
    if total == 0:
        raise TaskvecError("evaluation on an empty split")
    return {"accuracy": correct / total, "loss": loss_sum / total, "n": total}


# --- label noise ----------------------------------------------------------------------------------


def flip_labels(task: Task, indices, rate: float, seed: int = 0) -> tuple[Task, list[int]]:
    """A copy of ``task`` whose labels at ``indices`` are flipped with probability ``rate`` each.

    Every example ``i`` of the task gets two seeded uniform draws ``u_i, v_i`` (``numpy`` generator of
    ``seed``, in example order), independent of which split asks for it: example ``i`` is flipped iff it is in
    ``indices`` and ``u_i < rate``, to class ``(y_i + 1 + ⌊v_i·(C − 1)⌋) mod C`` (uniform over the other
    classes). So the same seed flips the same examples whether they are asked for as one split or as the
    union of two (a run on train ∪ val sees exactly the noisy labels of the run on train with validation
    on val). The number flipped is binomial, not exactly ``rate·len(indices)``.

    Returns ``(noisy_task, flipped)`` with the sorted flipped indices; ``rate = 0`` returns ``task`` itself.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate must be in [0, 1), got {rate}")
    if rate == 0:
        return task, []
    rng = np.random.default_rng(seed)
    u, v = rng.random(len(task)), rng.random(len(task))
    C = task.num_labels
    labels = list(task.labels)
    flipped = sorted({int(i) for i in indices if u[int(i)] < rate})
    for i in flipped:
        labels[i] = (labels[i] + 1 + int(v[i] * (C - 1))) % C
    return Task(task.name, task.texts, labels, task.label_names, task.texts_b, task.label_words,
                task.prompt), flipped


# --- model construction -----------------------------------------------------------------------------


def build_task_model(base, task: Task, tokenizer, train_batches: Batches | None, config: FinetuneConfig,
                     device=None) -> TaskModel:
    """Backbone of ``base`` plus a head for ``task`` (probe-initialised, label words, or random)."""
    # kernels need per-example gradients under vmap, which fall back to a slow loop over fused SDPA
    attn = "eager" if "spectral" in config.early_stopping else config.attn_implementation
    backbone = load_backbone(base, attn_implementation=attn)
    dec = is_decoder(backbone.config)
    kind = config.head
    if kind == "auto":
        kind = "label_words" if dec else "probe"
    pooling = "last" if dec else "mean"
    if kind == "label_words":
        if not dec:
            raise TaskvecError("label-word heads need a decoder LM; use head='probe' for encoders")
        words = task.label_words or task.label_names
        ids = label_word_ids(tokenizer, words)
        tied = bool(getattr(backbone.config, "tie_word_embeddings", False))
        weight = None
        if not tied:
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_pretrained(resolve_model(base))
            weight = lm.get_output_embeddings().weight[ids].detach().clone()
            del lm
        spec = HeadSpec("label_words", pooling, task.num_labels, task.label_names, list(words), ids,
                        task.prompt, tied, task.name)
        return TaskModel(backbone, LabelWordHead(ids, weight, tied), spec)
    spec = HeadSpec("linear", pooling, task.num_labels, task.label_names, task=task.name)
    model = TaskModel(backbone, LinearHead(backbone.config.hidden_size, task.num_labels), spec)
    if kind == "probe":
        if train_batches is None:
            raise TaskvecError("a probe head needs training batches")
        model.to(device or "cpu")
        feats, labels = extract_features(model, train_batches, device)
        W, b = fit_probe(feats, labels, task.num_labels, C=config.probe_C, seed=config.seed)
        with torch.no_grad():
            model.head.linear.weight.copy_(torch.from_numpy(W))
            model.head.linear.bias.copy_(torch.from_numpy(b))
    return model


def _trainable(model: TaskModel, config: FinetuneConfig):
    """Set requires_grad for the scope; wrap with peft for LoRA. Returns (model, selections, no_decay names)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if config.scope == "lora":
        from peft import LoraConfig, get_peft_model

        targets = config.lora_targets or lora_target_modules(model.backbone, "qv")
        lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, use_rslora=config.use_rslora, bias="none")
        model = get_peft_model(model, lcfg)
        sels = [n for n, p in model.named_parameters() if p.requires_grad]
        no_decay: set[str] = set()
    else:
        sel = resolve_scope(model.backbone, config.scope)
        freeze_outside(model.backbone, sel)
        sels = ["backbone." + s.name for s in sel]
        no_decay = {"backbone." + n for n in partial_param_names(sel)}
    if config.train_head:
        for n, p in model.named_parameters():
            if ".head." in f".{n}" or n.startswith("head."):
                p.requires_grad_(True)
    return model, sels, no_decay


def _optimizer(model, config: FinetuneConfig, no_decay: set[str]):
    decay, plain = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if (p.ndim < 2 or n in no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TaskvecError(f"scope {config.scope!r} selects no trainable parameter")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))


class _SingleProcess:
    """The few ``accelerate.Accelerator`` methods the loop uses, for machines without accelerate."""

    is_main_process = is_local_main_process = True

    def __init__(self, device):
        self.device = torch.device(device)

    def prepare(self, *objs):
        return objs

    def prepare_data_loader(self, dl):
        return _ToDevice(dl, self.device)

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def unwrap_model(self, model):
        return model

    def print(self, *a):
        print(*a)

    def wait_for_everyone(self):
        pass


class _ToDevice:
    def __init__(self, dl, device):
        self.dl, self.device = dl, device

    def __iter__(self):
        for b in self.dl:
            yield {k: v.to(self.device) for k, v in b.items()}


def _accelerator(device: str | None):
    """``accelerate.Accelerator`` (multi-process aware) when installed, else a single-process stand-in."""
    try:
        from accelerate import Accelerator
    except ImportError:
        return _SingleProcess(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Accelerator(cpu=(device == "cpu"))


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --- one task ----------------------------------------------------------------------------------------


def finetune_task(base, task: Task, out_dir, config: FinetuneConfig | None = None, splits: Splits | None = None,
                  overwrite: bool = False, progress: bool = True, accelerator=None) -> TaskResult:
    """Fine-tune ``base`` on ``task`` and write the task-model directory ``out_dir`` (see module doc).

    Resumes from ``<out_dir parent>/.<name>.ckpt/`` when present. Returns the :class:`TaskResult`.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    config = config or FinetuneConfig()
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    ckpt = out_dir.parent / f".{out_dir.name}.ckpt"
    if overwrite and ckpt.exists():
        shutil.rmtree(ckpt)
    acc = accelerator or _accelerator(config.device)
    device = acc.device
    _set_seed(config.seed)
    t0 = time.time()

    splits = splits or make_splits(task, config.seed, config.test_size, config.val_size, config.max_train)
    # label noise: train and validation labels only; the test split keeps the clean task
    noisy, flipped = flip_labels(task, list(splits.train) + list(splits.val), config.label_noise, config.seed)
    fset = set(flipped)
    noise = None if not config.label_noise else {
        "rate": config.label_noise, "seed": config.seed, "flipped_train": sum(i in fset for i in splits.train),
        "flipped_val": sum(i in fset for i in splits.val), "flipped": flipped}
    tok = load_tokenizer(base)
    backbone_cfg_is_decoder = None
    prompt = None
    if config.head in ("label_words",) or (config.head == "auto"):
        from transformers import AutoConfig

        backbone_cfg_is_decoder = is_decoder(AutoConfig.from_pretrained(resolve_model(base)))
        if backbone_cfg_is_decoder and config.head in ("auto", "label_words"):
            prompt = task.prompt
    mk = {"max_length": config.max_length, "prompt": prompt}
    train = Batches(tok, noisy, splits.train, config.batch_size, shuffle=True, seed=config.seed, **mk)
    ev = dict(mk, sort_by_length=True)
    probe_batches = Batches(tok, noisy, splits.train, config.eval_batch_size, **ev)
    val = Batches(tok, noisy, splits.val, config.eval_batch_size, **ev) if splits.val else None
    test = Batches(tok, task, splits.test, config.eval_batch_size, **ev)

    model = build_task_model(base, noisy, tok, probe_batches, config, device)
    model.to(device)
    model, sel_names, no_decay = _trainable(model, config)
    opt = _optimizer(model, config, no_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: config.lr_at(s) / config.lr if config.lr else 1.0)

    rules = []
    for name in config.early_stopping:
        kw = dict(config.rule_args.get(name, {}))
        if name == "patience":
            kw.setdefault("patience", config.patience)
            kw.setdefault("min_delta", config.min_delta)
            kw.setdefault("metric", config.metric)
            kw.setdefault("mode", "max" if "acc" in kw["metric"] else "min")
        rules.append(make_rule(name, **kw))
    if rules and val is None and any(r.name == "patience" for r in rules):
        raise TaskvecError(f"task {task.name!r}: patience early stopping needs a validation split")

    base_val = evaluate(model, val, config.loss, device=device) if val is not None else None
    probe_test = evaluate(model, test, config.loss, device=device)
    counts = np.bincount(test.labels.numpy(), minlength=task.num_labels)
    majority = float(counts.max() / counts.sum())

    model, opt, sched = acc.prepare(model, opt, sched)
    unwrapped = acc.unwrap_model(model)
    ctx = TrainContext(unwrapped, sel_names, lambda: iter(probe_batches), train.num_examples, task.num_labels,
                       config.lr_at, config.max_steps, config.optimizer, config.batch_size, config.loss, device)
    curve: list[dict] = []
    if base_val is not None or config.test_curve:
        first: dict = {"step": 0, "train_loss": None}
        if base_val is not None:
            first.update(val_loss=base_val["loss"], val_accuracy=base_val["accuracy"])
        if config.test_curve:
            first.update(test_loss=probe_test["loss"], test_accuracy=probe_test["accuracy"])
        curve.append(first)
    step, best_state, best_step, best_metric = 0, None, 0, None
    mode_max = "acc" in config.metric
    stop: StopDecision | None = None
    if ckpt.exists() and (ckpt / "state.json").exists():  # resume
        st = json.loads((ckpt / "state.json").read_text())
        _load_trainable(unwrapped, load_file(str(ckpt / "trainable.safetensors")))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        sched.load_state_dict(st["scheduler"])
        step, best_step, best_metric, curve = st["step"], st["best_step"], st["best_metric"], st["curve"]
        if (ckpt / "best.safetensors").exists():
            best_state = load_file(str(ckpt / "best.safetensors"))
        for r, rs in zip(rules, st["rules"]):
            r.load_state_dict(rs)
        acc.print(f"[{task.name}] resuming at step {step}")
    for r in rules:
        r.start(ctx)
        if step == 0 and base_val is not None:  # the base (probe head) is the first candidate checkpoint
            r.update(0, {"step": 0, "val_loss": base_val["loss"], "val_accuracy": base_val["accuracy"]})
    # evaluation steps: every eval_every, the configured extra steps, the steps rules ask for, the last
    eval_at = set(config.eval_steps) | {int(k) for r in rules for k in getattr(r, "eval_steps", list)() if k >= 1}
    if best_state is None:
        best_state = _trainable_state(unwrapped)
        best_metric = None if base_val is None else base_val["accuracy" if mode_max else "loss"]

    steps_per_epoch = len(train)
    bar = tqdm(total=config.max_steps, initial=step, desc=f"finetune {task.name}", disable=not progress
               or not acc.is_local_main_process, dynamic_ncols=True)
    model.train()
    running, running_n, last_good = 0.0, 0, dict(best_state)
    while step < config.max_steps and stop is None:
        epoch, offset = divmod(step, steps_per_epoch)
        order = train.order(epoch)
        chunks = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        dl = acc.prepare_data_loader(torch.utils.data.DataLoader(chunks[offset:], batch_size=None,
                                                                  collate_fn=train.batch))
        for batch in dl:
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            loss = loss_fn(logits, batch["labels"], config.loss)
            if not torch.isfinite(loss):
                _load_trainable(unwrapped, last_good)
                stop = StopDecision(f"non-finite loss ({float(loss)}) at step {step + 1}: kept the last good "
                                    f"weights (step {curve[-1]['step'] if curve else 0})", step)
                acc.print(f"[{task.name}] {stop.reason}")
                break
            acc.backward(loss)
            if config.grad_clip:
                acc.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            running += loss.item()
            running_n += 1
            bar.update(1)
            metrics = seen = None
            if step % config.eval_every == 0 or step == config.max_steps or step in eval_at:
                metrics = {"step": step, "train_loss": running / max(running_n, 1)}
                running, running_n = 0.0, 0
                if val is not None:
                    ev = evaluate(model, val, config.loss, device=device)
                    metrics.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
                    value = ev["accuracy" if mode_max else "loss"]
                    if best_metric is None or (value > best_metric if mode_max else value < best_metric):
                        best_metric, best_step, best_state = value, step, _trainable_state(unwrapped)
                seen = dict(metrics)  # what the rules see: never test metrics
                if config.test_curve:
                    te = evaluate(model, test, config.loss, device=device)
                    metrics.update(test_loss=te["loss"], test_accuracy=te["accuracy"])
                curve.append(metrics)
                last_good = _trainable_state(unwrapped)
                bar.set_postfix({k: round(v, 4) for k, v in metrics.items() if k != "step"})
            for r in rules:
                d = r.update(step, seen)
                if d is not None and stop is None:
                    stop = d
            if metrics is not None and acc.is_main_process and stop is None:  # resumable checkpoint
                ckpt.mkdir(parents=True, exist_ok=True)
                save_file({k: v.cpu().contiguous() for k, v in _trainable_state(unwrapped).items()},
                          str(ckpt / "trainable.safetensors"))
                save_file({k: v.cpu().contiguous() for k, v in best_state.items()}, str(ckpt / "best.safetensors"))
                torch.save(opt.state_dict(), ckpt / "optimizer.pt")
                write_json(ckpt / "state.json", {"step": step, "best_step": best_step, "best_metric": best_metric,
                                                 "curve": curve, "scheduler": sched.state_dict(),
                                                 "rules": [r.state_dict() for r in rules]})
            if stop is not None or step >= config.max_steps:
                break
    bar.close()
    if stop is None:
        stop = StopDecision(f"max_steps ({config.max_steps}) reached", step)

    # keep the best validation checkpoint (or the rule's chosen step if it names one we have)
    if val is not None and best_state is not None and not stop.reason.startswith("non-finite"):
        _load_trainable(unwrapped, best_state)
        kept = best_step
    else:
        kept = step
    final_test = evaluate(model, test, config.loss, device=device)
    wall = time.time() - t0

    result = TaskResult(task.name, str(out_dir), stop.reason, kept, step, probe_test["accuracy"],
                        final_test["accuracy"], final_test["loss"], majority, wall, curve,
                        [r.summary() for r in rules])
    if acc.is_main_process:
        inner = unwrapped
        with atomic_dir(out_dir, overwrite) as tmp:
            if config.scope == "lora":
                inner.save_pretrained(tmp / "adapter")
                merged = inner.merge_and_unload()
                task_model = merged
            else:
                task_model = inner
            task_model.save(tmp / "_tm", tokenizer=tok)
            for p in (tmp / "_tm").iterdir():
                shutil.move(str(p), tmp / p.name)
            (tmp / "_tm").rmdir()
            write_json(tmp / "log.json", {
                **asdict(result), "config": asdict(config), "base_model": str(resolve_model(base)),
                "probe": {"test_accuracy": probe_test["accuracy"], "test_loss": probe_test["loss"],
                          "val_accuracy": base_val["accuracy"] if base_val else None},
                "test": final_test, "label_names": task.label_names, "label_noise": noise})
            write_json(tmp / "split.json", splits.to_json())
            save_task(task, tmp / "task.json")
        shutil.rmtree(ckpt, ignore_errors=True)
    acc.wait_for_everyone()
    return result


# --- several tasks -------------------------------------------------------------------------------------


def finetune(base, tasks, out, config: FinetuneConfig | None = None, overwrite: bool = False,
             progress: bool = True) -> list[TaskResult]:
    """Fine-tune ``base`` on every task independently; results under ``out/finetune/<task>/``.

    ``tasks``: names of bundled tasks, file paths, or :class:`Task` objects. A task whose directory is
    already complete is reused (its log is read back), so a re-run resumes where it stopped; ``overwrite``
    redoes everything. Writes ``out/run.json``.
    """
    config = config or FinetuneConfig()
    out = Path(out)
    tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    if not tasks:
        raise TaskvecError("no tasks given")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TaskvecError(f"duplicate task names: {names}")
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / "run.json"
    meta = {"base_model": str(resolve_model(base)), "scope": config.scope, "tasks": names,
            "config": asdict(config)}
    if run_json.exists() and not overwrite:
        old = json.loads(run_json.read_text())
        # fields added to FinetuneConfig after a run was written count as their defaults
        old_config = {**asdict(FinetuneConfig()), **old.get("config", {})}
        if old.get("base_model") != meta["base_model"] or old_config != meta["config"]:
            raise TaskvecError(f"{out} holds a run with another base model or configuration; use a new "
                               "output directory or overwrite=True (--overwrite)")
        meta["tasks"] = list(dict.fromkeys(old.get("tasks", []) + names))
    write_json(run_json, meta)
    results = []
    for t in tasks:
        d = out / "finetune" / t.name
        if d.exists() and (d / "log.json").exists() and not overwrite:
            log = json.loads((d / "log.json").read_text())
            keys = TaskResult.__dataclass_fields__.keys()
            results.append(TaskResult(**{k: log[k] for k in keys if k in log}))
            continue
        random.seed(config.seed)
        results.append(finetune_task(base, t, d, config, overwrite=overwrite, progress=progress))
    write_json(out / "finetune" / "summary.json", [asdict(r) | {"curve": None} for r in results])
    return results


def results_table(results: list[TaskResult]) -> str:
    """Markdown table: probe vs fine-tuned test accuracy, stop step, wall time."""
    rows = ["| task | majority | probe acc | fine-tuned acc | Δ (points) | best step | steps run | stop | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        stop = r.stop_reason.split(":")[0]
        rows.append(f"| {r.task} | {100 * r.majority_accuracy:.1f} | {100 * r.probe_test_accuracy:.1f} | "
                    f"{100 * r.test_accuracy:.1f} | {100 * (r.test_accuracy - r.probe_test_accuracy):+.1f} | "
                    f"{r.best_step} | {r.steps} | {stop} | {r.wall_time_s:.0f} |")
    if results:
        m = sum(r.test_accuracy - r.probe_test_accuracy for r in results) / len(results)
        rows.append(f"| **mean** | | {100 * np.mean([r.probe_test_accuracy for r in results]):.1f} | "
                    f"{100 * np.mean([r.test_accuracy for r in results]):.1f} | {100 * m:+.1f} | | | | "
                    f"{sum(r.wall_time_s for r in results):.0f} |")
    return "\n".join(rows)


def load_run(run_dir) -> dict:
    """``run.json`` of a fine-tuning run directory."""
    p = Path(run_dir) / "run.json"
    if not p.exists():
        raise TaskvecError(f"{run_dir} is not a taskvec run directory (no run.json)")
    return json.loads(p.read_text())


def extract_vectors(run_dir, overwrite: bool = False) -> dict:
    """Extract τ_t = θ_t − θ0 for every fine-tuned task of a run into ``RUN/vectors/<task>.safetensors``.

    LoRA runs use the exact adapter product (``TaskVector.from_peft``). Returns ``{task: TaskVector}``.
    """
    from .task_vector import TaskVector

    run_dir = Path(run_dir)
    meta = load_run(run_dir)
    base = meta["base_model"]
    out = {}
    vdir = run_dir / "vectors"
    vdir.mkdir(exist_ok=True)
    for name in meta["tasks"]:
        d = run_dir / "finetune" / name
        if not (d / "log.json").exists():
            raise TaskvecError(f"task {name!r} of {run_dir} has not finished fine-tuning ({d} is missing)")
        path = vdir / f"{name}.safetensors"
        if path.exists() and not overwrite:
            out[name] = TaskVector.load(path)
            continue
        if meta["scope"] == "lora" and (d / "adapter").exists():
            tv = TaskVector.from_peft(d / "adapter", base=base, task=name)
            tv.base_model = base
        else:
            tv = TaskVector.from_models(base, d, scope=meta["scope"], task=name)
        tv.save(path, overwrite=True)
        out[name] = tv
    return out


class _CallableModule(_types.ModuleType):
    """Lets ``taskvec.finetune(base, tasks, out, config)`` call :func:`finetune` although ``taskvec.finetune`` is
    also this module (the package attribute becomes the module once it is imported)."""

    def __call__(self, *args, **kwargs):
        return finetune(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
