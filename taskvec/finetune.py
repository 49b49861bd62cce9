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
last good weights, and says so in the log. The task-independent pieces (head building, scope, optimiser,
evaluation, label noise, accelerator stand-in, checkpoint files) live in :mod:`taskvec.training`; messages go
to the ``taskvec.finetune`` logger.
"""

from __future__ import annotations

import logging
import random
import shutil
import sys as _sys
import time
import types as _types
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, TaskvecError
from .io import atomic_dir, check_output, remove_stale_temporaries, run_lock, write_json
from .lm_objective import lm_batches, resolve_objective, token_loss
from .modeling import check_model, is_decoder, load_tokenizer, resolve_model
from .stopping import StopDecision, TrainContext, make_rule
from .tasks import Batches, Splits, Task, load_task, make_splits, save_task
from .finetune_config import ConfigError, FinetuneConfig  # noqa: F401 (re-exported)
from .task_result import RESULT_COLUMNS, TaskResult, results_table  # noqa: F401 (re-exported)
from .training import (  # build_task_model, evaluate and flip_labels are part of this module's API
    build_task_model,
    evaluate,
    flip_labels,
    load_checkpoint,
    load_trainable,
    make_accelerator,
    make_optimizer,
    restore_random,
    save_checkpoint,
    set_seed,
    set_trainable,
    trainable_state,
)

log = logging.getLogger(__name__)


# --- the training loss ----------------------------------------------------------------------------------


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Mean loss over the batch: cross-entropy, or squared error ½‖f − onehot(y)‖² (``mse``); LM task models
    (labels ``(B, L)``): the mean next-token NLL of the scored tokens (:func:`taskvec.lm_objective.token_loss`)."""
    if labels.dim() == 2:
        return token_loss(logits, labels)
    if kind == "ce":
        return F.cross_entropy(logits.float(), labels)
    onehot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return 0.5 * ((logits - onehot) ** 2).sum(-1).mean()


# --- one task: set-up ---------------------------------------------------------------------------------


@dataclass
class _TaskData:
    """One task's tokenised splits. ``task`` carries the (possibly flipped) training and validation labels;
    ``test`` is tokenised from the clean task."""

    task: Task
    tokenizer: object
    splits: Splits
    train: Batches  # shuffled per epoch
    probe: Batches  # the training split in a fixed order (probe fit, the rules' training batches)
    val: Batches | None
    test: Batches
    noise: dict | None  # log.json's "label_noise"


def _task_data(base, task: Task, config: FinetuneConfig, splits: Splits | None) -> _TaskData:
    """Splits, label noise (train and validation labels only), tokenizer, prompt, batches."""
    splits = splits or make_splits(task, config.seed, config.test_size, config.val_size, config.max_train)
    noisy, flipped = flip_labels(task, list(splits.train) + list(splits.val), config.label_noise, config.seed)
    fset = set(flipped)
    noise = None if not config.label_noise else {
        "rate": config.label_noise, "seed": config.seed, "flipped_train": sum(i in fset for i in splits.train),
        "flipped_val": sum(i in fset for i in splits.val), "flipped": flipped}
    tok = load_tokenizer(base)
    objective = resolve_objective(config.objective, task, config.early_stopping)
    if objective != "classify":  # LM objectives: (context, continuation) token pairs (taskvec.lm_objective)
        train, val, test = lm_batches(base, tok, task, noisy, splits, config, objective)
        return _TaskData(noisy, tok, splits, train, train, val, test, noise)
    prompt = None
    if config.head in ("auto", "label_words"):  # decoders read the task through its prompt
        from transformers import AutoConfig

        if is_decoder(AutoConfig.from_pretrained(resolve_model(base))):
            prompt = task.prompt
    mk = {"max_length": config.max_length, "prompt": prompt}
    train = Batches(tok, noisy, splits.train, config.batch_size, shuffle=True, seed=config.seed, **mk)
    ev = dict(mk, sort_by_length=True)
    probe = Batches(tok, noisy, splits.train, config.eval_batch_size, **ev)
    val = Batches(tok, noisy, splits.val, config.eval_batch_size, **ev) if splits.val else None
    test = Batches(tok, task, splits.test, config.eval_batch_size, **ev)
    return _TaskData(noisy, tok, splits, train, probe, val, test, noise)


def _model_and_optimizer(base, data: _TaskData, config: FinetuneConfig, device):
    """The task model on ``device`` with its scope trainable, the optimiser and the LR schedule."""
    model = build_task_model(base, data.task, data.tokenizer, data.probe, config, device)
    model.to(device)
    model, sel_names, no_decay = set_trainable(model, config)
    opt = make_optimizer(model, config, no_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: config.lr_at(s) / config.lr if config.lr else 1.0)
    return model, sel_names, opt, sched


def _make_rules(config: FinetuneConfig, task_name: str, has_val: bool) -> list:
    """The stopping rules of ``config.early_stopping`` (``patience`` gets the config's patience settings)."""
    rules = []
    for name in config.early_stopping:
        kw = dict(config.rule_args.get(name, {}))
        if name == "patience":
            kw.setdefault("patience", config.patience)
            kw.setdefault("min_delta", config.min_delta)
            kw.setdefault("metric", config.metric)
            kw.setdefault("mode", "max" if "acc" in kw["metric"] else "min")
        rules.append(make_rule(name, **kw))
    if rules and not has_val and any(r.name == "patience" for r in rules):
        raise TaskvecError(f"task {task_name!r}: patience early stopping needs a validation split")
    return rules


@dataclass
class _Progress:
    """Where the loop stands: what the checkpoint's ``state.json`` saves, plus the best tensors and the stop."""

    curve: list[dict]
    step: int = 0
    best_step: int = 0
    best_metric: float | None = None
    best_state: dict | None = None
    stop: StopDecision | None = None
    #: on a resume: sets the random generators as they were at the checkpoint (called by :func:`_train`)
    restore_random: object = None

    def checkpoint_state(self) -> dict:
        return {"step": self.step, "best_step": self.best_step, "best_metric": self.best_metric,
                "curve": self.curve}


def _start(name: str, ckpt: Path, unwrapped, opt, sched, rules, ctx: TrainContext, config: FinetuneConfig,
           base_val: dict | None, probe_test: dict, acc) -> _Progress:
    """The step-0 curve entry, the state resumed from ``ckpt`` if any, the rules started (and shown the base as
    their first candidate), the best checkpoint so far."""
    curve: list[dict] = []
    if base_val is not None or config.test_curve:
        first: dict = {"step": 0, "train_loss": None}
        if base_val is not None:
            first.update(val_loss=base_val["loss"], val_accuracy=base_val["accuracy"])
        if config.test_curve:
            first.update(test_loss=probe_test["loss"], test_accuracy=probe_test["accuracy"])
        curve.append(first)
    p = _Progress(curve)
    resumed = load_checkpoint(ckpt, unwrapped, opt, sched, rules)
    if resumed is not None:
        st, p.best_state = resumed
        p.step, p.best_step, p.best_metric, p.curve = st["step"], st["best_step"], st["best_metric"], st["curve"]
        if acc.is_local_main_process:
            log.info("[%s] resuming at step %d", name, p.step)
    for r in rules:
        r.start(ctx)
        if p.step == 0 and base_val is not None:  # the base (probe head) is the first candidate checkpoint
            r.update(0, {"step": 0, "val_loss": base_val["loss"], "val_accuracy": base_val["accuracy"]})
    if p.best_state is None:
        p.best_state = trainable_state(unwrapped)
        p.best_metric = None if base_val is None else base_val["accuracy" if "acc" in config.metric else "loss"]
    if resumed is not None:  # dropout draws on from where the checkpoint was taken (see _train)
        st = resumed[0]
        p.restore_random = lambda: restore_random(ckpt, st)
    return p


def _batches(loader, restore):
    """The batches of ``loader``; ``restore`` (if any) is called once the first batch is drawn, i.e. after
    the loader drew its own seed from torch's generator, as the epoch's loader of an uninterrupted run did
    before the checkpoint was taken."""
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        return
    if restore is not None:
        restore()
    yield first
    yield from it


# --- one task: the loop -----------------------------------------------------------------------------------


def _evaluation(model, unwrapped, data: _TaskData, config: FinetuneConfig, p: _Progress, train_loss: float,
                device) -> tuple[dict, dict]:
    """Evaluate at step ``p.step``: appends to the curve, updates the best checkpoint. Returns ``(metrics,
    seen)``: the curve entry, and what the rules see (never test metrics)."""
    mode_max = "acc" in config.metric
    metrics = {"step": p.step, "train_loss": train_loss}
    if data.val is not None:
        ev = evaluate(model, data.val, config.loss, device=device)
        metrics.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
        value = ev["accuracy" if mode_max else "loss"]
        if p.best_metric is None or (value > p.best_metric if mode_max else value < p.best_metric):
            p.best_metric, p.best_step, p.best_state = value, p.step, trainable_state(unwrapped)
    seen = dict(metrics)
    if config.test_curve:
        te = evaluate(model, data.test, config.loss, device=device)
        metrics.update(test_loss=te["loss"], test_accuracy=te["accuracy"])
    p.curve.append(metrics)
    return metrics, seen


def _train(model, unwrapped, acc, opt, sched, rules, data: _TaskData, config: FinetuneConfig, p: _Progress,
           eval_at: set[int], ckpt: Path, bar, device) -> None:
    """Train from ``p.step`` until ``max_steps`` or a stop (``p.stop``); checkpoint at every evaluation."""
    steps_per_epoch = len(data.train)
    model.train()
    running, running_n, last_good = 0.0, 0, trainable_state(unwrapped)  # the weights at p.step (also resumed)
    restore, p.restore_random = p.restore_random, None
    while p.step < config.max_steps and p.stop is None:
        epoch, offset = divmod(p.step, steps_per_epoch)
        order = data.train.order(epoch)
        chunks = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        dl = acc.prepare_data_loader(torch.utils.data.DataLoader(chunks[offset:], batch_size=None,
                                                                  collate_fn=data.train.batch))
        # resumed at an epoch's start: its loader draws its seed as it would have; mid-epoch: the loader of
        # this epoch drew it before the checkpoint, so the generators are set once this one has drawn
        if restore is not None and offset == 0:
            restore()
            restore = None
        for batch in _batches(dl, restore):
            restore = None
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            loss = loss_fn(logits, batch["labels"], config.loss)
            if not torch.isfinite(loss):
                load_trainable(unwrapped, last_good)
                p.stop = StopDecision(f"non-finite loss ({float(loss.detach())}) at step {p.step + 1}: kept the "
                                      f"last good weights (step {p.curve[-1]['step'] if p.curve else 0})", p.step)
                if acc.is_local_main_process:
                    log.warning("[%s] %s", data.task.name, p.stop.reason)
                break
            acc.backward(loss)
            if config.grad_clip:
                acc.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            p.step += 1
            running += loss.item()
            running_n += 1
            bar.update(1)
            metrics = seen = None
            if p.step % config.eval_every == 0 or p.step == config.max_steps or p.step in eval_at:
                metrics, seen = _evaluation(model, unwrapped, data, config, p, running / max(running_n, 1), device)
                running, running_n = 0.0, 0
                last_good = trainable_state(unwrapped)
                bar.set_postfix({k: round(v, 4) for k, v in metrics.items() if k != "step"})
            for r in rules:
                d = r.update(p.step, seen)
                if d is not None and p.stop is None:
                    p.stop = d
            if metrics is not None and acc.is_main_process and p.stop is None:  # resumable checkpoint
                save_checkpoint(ckpt, unwrapped, p.best_state, opt, sched, rules, p.checkpoint_state())
            if p.stop is not None or p.step >= config.max_steps:
                break


# --- one task: the task directory -------------------------------------------------------------------------


def _write_task_dir(out_dir: Path, overwrite: bool, model, base, task: Task, data: _TaskData,
                    config: FinetuneConfig, result: TaskResult, probe_test: dict, base_val: dict | None,
                    final_test: dict) -> None:
    """``out_dir`` atomically: ``model/`` + ``head.*`` (``adapter/`` for LoRA, then merged), ``log.json``,
    ``split.json``, ``task.json``."""
    with atomic_dir(out_dir, overwrite) as tmp:
        if config.scope == "lora":
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save(tmp / "_tm", tokenizer=data.tokenizer)
        for f in (tmp / "_tm").iterdir():
            shutil.move(str(f), tmp / f.name)
        (tmp / "_tm").rmdir()
        write_json(tmp / "log.json", {
            **asdict(result), "config": asdict(config), "base_model": str(resolve_model(base)),
            "probe": {"test_accuracy": probe_test["accuracy"], "test_loss": probe_test["loss"],
                      "val_accuracy": base_val["accuracy"] if base_val else None},
            "test": final_test, "label_names": task.label_names, "label_noise": data.noise})
        write_json(tmp / "split.json", data.splits.to_json())
        save_task(task, tmp / "task.json")


# --- one task ----------------------------------------------------------------------------------------


def finetune_task(base, task: Task, out_dir, config: FinetuneConfig | None = None, splits: Splits | None = None,
                  overwrite: bool = False, progress: bool = True, accelerator=None) -> TaskResult:
    """Fine-tune ``base`` on ``task`` and write the task-model directory ``out_dir`` (see module doc).

    Resumes from ``<out_dir parent>/.<name>.ckpt/`` when present. Returns the :class:`TaskResult`.
    """
    from tqdm.auto import tqdm

    config = config or FinetuneConfig()
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    ckpt = out_dir.parent / f".{out_dir.name}.ckpt"
    if overwrite and ckpt.exists():
        shutil.rmtree(ckpt)
    acc = accelerator or make_accelerator(config.device)
    device = acc.device
    set_seed(config.seed)
    t0 = time.time()

    data = _task_data(base, task, config, splits)
    model, sel_names, opt, sched = _model_and_optimizer(base, data, config, device)
    rules = _make_rules(config, task.name, data.val is not None)
    base_val = evaluate(model, data.val, config.loss, device=device) if data.val is not None else None
    probe_test = evaluate(model, data.test, config.loss, device=device)
    counts = np.bincount(data.test.labels.numpy(), minlength=task.num_labels)
    majority = float(counts.max() / counts.sum())

    model, opt, sched = acc.prepare(model, opt, sched)
    unwrapped = acc.unwrap_model(model)
    ctx = TrainContext(unwrapped, sel_names, lambda: iter(data.probe), data.train.num_examples, task.num_labels,
                       config.lr_at, config.max_steps, config.optimizer, config.batch_size, config.loss, device)
    p = _start(task.name, ckpt, unwrapped, opt, sched, rules, ctx, config, base_val, probe_test, acc)
    # evaluation steps: every eval_every, the configured extra steps, the steps rules ask for, the last
    eval_at = set(config.eval_steps) | {int(k) for r in rules for k in getattr(r, "eval_steps", list)() if k >= 1}
    bar = tqdm(total=config.max_steps, initial=p.step, desc=f"finetune {task.name}", disable=not progress
               or not acc.is_local_main_process, dynamic_ncols=True)
    try:
        _train(model, unwrapped, acc, opt, sched, rules, data, config, p, eval_at, ckpt, bar, device)
    finally:  # also on Ctrl-C: the bar's line ends before the CLI says it was interrupted
        bar.close()
    stop = p.stop if p.stop is not None else StopDecision(f"max_steps ({config.max_steps}) reached", p.step)

    # keep the best validation checkpoint (or the rule's chosen step if it names one we have)
    if data.val is not None and p.best_state is not None and not stop.reason.startswith("non-finite"):
        load_trainable(unwrapped, p.best_state)
        kept = p.best_step
    else:
        kept = p.step
    final_test = evaluate(model, data.test, config.loss, device=device)
    result = TaskResult(task.name, str(out_dir), stop.reason, kept, p.step, probe_test["accuracy"],
                        final_test["accuracy"], final_test["loss"], majority, time.time() - t0, p.curve,
                        [r.summary() for r in rules])
    if acc.is_main_process:
        _write_task_dir(out_dir, overwrite, unwrapped, base, task, data, config, result, probe_test, base_val,
                        final_test)
        shutil.rmtree(ckpt, ignore_errors=True)
        remove_stale_temporaries(ckpt)  # a checkpoint half-written by a killed process
    acc.wait_for_everyone()
    return result


# --- several tasks -------------------------------------------------------------------------------------


def finetune(base, tasks, out, config: FinetuneConfig | None = None, overwrite: bool = False,
             progress: bool = True) -> list[TaskResult]:
    """Fine-tune ``base`` on every task independently; results under ``out/finetune/<task>/``.

    ``tasks``: names of bundled tasks, file paths, or :class:`Task` objects. A task whose directory is
    already complete is reused (its log is read back), so a re-run resumes where it stopped; ``overwrite``
    redoes everything. Writes ``out/run.json``.

    Everything that can be checked before training is checked before ``out`` is touched: the tasks and
    their splits, the base model's directory (config, weights, tokenizer) and the stopping rules. ``out``
    is locked for the whole call (:func:`taskvec.io.run_lock`): a second process fine-tuning into it, or
    running the pipeline there, is refused with a one-line message naming this one.
    """
    config = config or FinetuneConfig()
    out = Path(out)
    tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    if not tasks:
        raise TaskvecError("no tasks given")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TaskvecError(f"duplicate task names: {names}")
    splits = preflight(base, tasks, config)
    with run_lock(out, "taskvec finetune"):
        return _finetune_locked(base, tasks, out, config, splits, overwrite, progress)


def preflight(base, tasks: list[Task], config: FinetuneConfig) -> dict[str, Splits]:
    """What fine-tuning can check before writing anything: every task's splits, the base model's directory
    (:func:`taskvec.modeling.check_model`: config, safetensors headers, tokenizer) and the stopping rules
    with their arguments. Returns ``{task: Splits}``."""
    splits = {t.name: _checked_splits(t, config) for t in tasks}
    check_model(base)
    try:
        _make_rules(config, tasks[0].name if tasks else "", True)
    except TypeError as e:
        raise ConfigError(f"rule_args {config.rule_args}: {e}") from None
    return splits


def _checked_splits(task: Task, config: FinetuneConfig) -> Splits:
    """The task's splits (:func:`make_splits`), made before anything is written; a file task's errors name
    its file."""
    try:
        return make_splits(task, config.seed, config.test_size, config.val_size, config.max_train)
    except DataError as e:
        source = getattr(task, "source", None)
        raise DataError(f"{source}: {e}" if source and str(source) not in str(e) else str(e)) from None


def _finetune_locked(base, tasks: list[Task], out: Path, config: FinetuneConfig, splits: dict, overwrite: bool,
                     progress: bool) -> list[TaskResult]:
    from .runs import finished_log, read_description, run_file, stage_path, task_dir

    names = [t.name for t in tasks]
    meta = {"base_model": str(resolve_model(base)), "scope": config.scope, "tasks": names,
            "config": asdict(config)}
    old = None if overwrite else read_description(out)
    if old is not None:
        _check_same_run(out, run_file(out), old, meta)
        meta["tasks"] = list(dict.fromkeys(old.get("tasks", []) + names))
    out.mkdir(parents=True, exist_ok=True)  # only once the tasks, the model and the config are known good
    write_json(run_file(out), meta)
    results = []
    for t in tasks:
        d = task_dir(out, t.name)
        log = None if overwrite else finished_log(out, t.name)
        if log is not None:
            keys = TaskResult.__dataclass_fields__.keys()
            results.append(TaskResult(**{k: log[k] for k in keys if k in log}))
            continue
        random.seed(config.seed)
        results.append(finetune_task(base, t, d, config, splits=splits[t.name], overwrite=overwrite,
                                     progress=progress))
    write_json(stage_path(out, "finetune") / "summary.json", [asdict(r) | {"curve": None} for r in results])
    return results


def _check_same_run(out: Path, path: Path, old, meta: dict) -> None:
    """Refuse to add to the run ``old`` (its ``run.json`` at ``path``) with another base model or config,
    naming what differs."""
    hint = "use a new output directory or overwrite=True (--overwrite)"
    if not isinstance(old, dict):
        raise TaskvecError(f"{path} is not a run description (expected a JSON object with base_model, tasks, "
                           f"config; got {type(old).__name__}); {hint}")
    if "base_model" not in old:
        raise TaskvecError(f"{path} has no base_model (written by another taskvec version?); {hint}")
    for k, tp, what in (("tasks", list, "a list of task names"), ("config", dict, "a mapping")):
        if not isinstance(old.get(k, tp()), tp):
            raise TaskvecError(f"{path}: {k} is not {what} (written by another taskvec version?); {hint}")
    if old["base_model"] != meta["base_model"]:
        raise TaskvecError(f"{out} holds a run with another base model or configuration (base_model: "
                           f"{old['base_model']!r} there, {meta['base_model']!r} here); {hint}")
    # fields added to FinetuneConfig after a run was written count as their defaults
    old_config = {**asdict(FinetuneConfig()), **old.get("config", {})}
    diff = [k for k in sorted(set(old_config) | set(meta["config"])) if old_config.get(k) != meta["config"].get(k)]
    if diff:
        shown = ", ".join(f"{k}: {old_config.get(k)!r} there, {meta['config'].get(k)!r} here" for k in diff[:3])
        raise TaskvecError(f"{out} holds a run with another base model or configuration ({shown}"
                           f"{', ...' if len(diff) > 3 else ''}); {hint}")


def load_run(run_dir) -> dict:
    """``run.json`` of a fine-tuning run directory, read through :class:`taskvec.runs.Run`."""
    from .runs import open_run

    return open_run(run_dir, require="run").description()


def extract_vectors(run_dir, overwrite: bool = False) -> dict:
    """Extract τ_t = θ_t − θ0 for every fine-tuned task of a run into ``RUN/vectors/<task>.safetensors``
    (:func:`taskvec.stages.vectors.extract_vectors`; LoRA runs use the exact adapter product).
    Returns ``{task: TaskVector}``."""
    from .runs import open_run
    from .stages.vectors import extract_vectors as extract

    return extract(open_run(run_dir), overwrite=overwrite)


class _CallableModule(_types.ModuleType):
    """Lets ``taskvec.finetune(base, tasks, out, config)`` call :func:`finetune` although ``taskvec.finetune`` is
    also this module (the package attribute becomes the module once it is imported)."""

    def __call__(self, *args, **kwargs):
        return finetune(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
