"""The building blocks of fine-tuning one task (:func:`taskvec.finetune.finetune_task` puts them together).

* :func:`build_task_model`: the base's backbone plus a head (probe-initialised, label words, or random);
* the trainable scope (:func:`set_trainable`: ``requires_grad`` for a scope, or peft's LoRA wrapper) and the
  optimiser (:func:`make_optimizer`: AdamW or SGD, no decay on biases, norms and partially trained tensors);
* :func:`evaluate` (accuracy and mean loss over batches) and :func:`flip_labels` (seeded label noise);
* :func:`make_accelerator`: ``accelerate.Accelerator`` when installed, else a single-process stand-in with
  the few methods the loop calls;
* :func:`set_seed`, and snapshots of the trainable tensors (:func:`trainable_state`, :func:`load_trainable`);
* the resumable checkpoint ``RUN/finetune/.<task>.ckpt/`` (:func:`save_checkpoint`, :func:`load_checkpoint`):
  ``trainable.safetensors`` (current trainable tensors), ``best.safetensors`` (the best validation
  checkpoint so far), ``optimizer.pt``, ``rng.safetensors`` (torch's generators), and ``state.json`` =
  ``{step, best_step, best_metric, curve, scheduler, rules, random}``; replaced atomically as a whole.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TaskvecError
from .io import atomic_dir, write_json
from .modelfn import eval_mode
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
    quiet_transformers,
    resolve_model,
)
from .scopes import freeze_outside, lora_target_modules, partial_param_names, resolve_scope
from .tasks import Batches, Task

if TYPE_CHECKING:  # pragma: no cover
    from .finetune import FinetuneConfig


# --- the task model -------------------------------------------------------------------------------------


def build_task_model(base, task: Task, tokenizer, train_batches: Batches | None, config: FinetuneConfig,
                     device=None) -> TaskModel:
    """Backbone of ``base`` plus a head for ``task`` (probe-initialised, label words, or random)."""
    # kernels need per-example gradients under vmap, which fall back to a slow loop over fused SDPA
    attn = "eager" if "spectral" in config.early_stopping else config.attn_implementation
    backbone = load_backbone(base, attn_implementation=attn)
    dec = is_decoder(backbone.config)
    from .lm_objective import make_lm_model, resolve_objective

    objective = resolve_objective(config.objective, task)
    if objective != "classify":  # the LM's own head over every position (taskvec.lm_objective)
        if not dec:
            raise TaskvecError(f"task {task.name!r}: objective {objective!r} needs a decoder LM (an encoder has no "
                               "LM head); use objective='classify'")
        return make_lm_model(backbone, task, base)
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

            with quiet_transformers():
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


# --- scope and optimiser ----------------------------------------------------------------------------------


def set_trainable(model: TaskModel, config: FinetuneConfig):
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


def make_optimizer(model, config: FinetuneConfig, no_decay: set[str]):
    """AdamW or SGD over the trainable parameters; weight decay only on full matrices outside ``no_decay``."""
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


# --- evaluation -----------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(model: TaskModel, batches, loss: str = "ce", accelerator=None, device=None) -> dict:
    """Accuracy and mean loss of ``model`` over tokenised batches (eval mode; restores the mode after).

    Returns ``{"accuracy", "loss", "n"}``. For an LM task model (``(B, L, V)`` logits, ``(B, L)`` labels) the
    figures are per scored token: ``loss`` = Σ NLL / Σ tokens (nats), ``accuracy`` = share of next tokens
    predicted top-1, ``n`` = tokens. With an ``accelerator`` the batches are the process's shard and
    results are gathered.
    """
    correct, total, loss_sum = 0.0, 0, 0.0
    with eval_mode(model):
        for b in batches:
            if device is not None:
                b = {k: v.to(device) for k, v in b.items()}
            logits = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            y = b["labels"]
            if logits.dim() == 3:  # LM objectives: per scored token (taskvec.lm_objective), Σ NLL / Σ tokens
                from .lm_objective import token_terms

                per, hit, y = token_terms(logits, y)
                pred = hit.float()  # compared with y = ones below: correct top-1 next tokens
            else:
                pred = logits.argmax(-1)
                per = (F.cross_entropy(logits.float(), y, reduction="none") if loss == "ce"
                       else 0.5 * ((logits - F.one_hot(y, logits.shape[-1]).to(logits.dtype)) ** 2).sum(-1))
            if accelerator is not None:
                pred, y, per = accelerator.gather_for_metrics((pred, y, per))
            correct += float((pred == y).sum())
            total += int(y.numel())
            loss_sum += float(per.sum())
    if total == 0:
        raise TaskvecError("evaluation on an empty split")
    return {"accuracy": correct / total, "loss": loss_sum / total, "n": total}


# --- label noise ----------------------------------------------------------------------------------------


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


# --- processes, seeds, snapshots --------------------------------------------------------------------------


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

    def wait_for_everyone(self):
        pass


class _ToDevice:
    def __init__(self, dl, device):
        self.dl, self.device = dl, device

    def __iter__(self):
        for b in self.dl:
            yield {k: v.to(self.device) for k, v in b.items()}


def make_accelerator(device: str | None):
    """``accelerate.Accelerator`` (multi-process aware) when installed, else a single-process stand-in."""
    try:
        from accelerate import Accelerator
    except ImportError:
        return _SingleProcess(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Accelerator(cpu=(device == "cpu"))


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Copies of the tensors that train (``requires_grad``), by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` snapshot back into ``model`` in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))


# --- the resumable checkpoint -----------------------------------------------------------------------------


def save_checkpoint(ckpt: Path, model, best_state: dict, opt, sched, rules, state: dict) -> None:
    """Write the checkpoint directory ``ckpt``: trainable and best tensors, optimiser, the random generators'
    states (``rng.safetensors``: torch's CPU and CUDA generators; Python's and numpy's in ``state.json``, so
    dropout draws the same numbers after a resume), and ``state.json`` = ``state`` (``step``, ``best_step``,
    ``best_metric``, ``curve``) plus the scheduler's and rules' states.

    The directory is replaced atomically (:func:`taskvec.io.atomic_dir`): a process killed while writing it
    leaves the previous checkpoint whole, never the tensors of one step with the state of another."""
    from safetensors.torch import save_file

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    py_state = random.getstate()
    with atomic_dir(ckpt, overwrite=True) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in trainable_state(model).items()},
                  str(tmp / "trainable.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in best_state.items()}, str(tmp / "best.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "state.json", {
            **state, "scheduler": sched.state_dict(), "rules": [r.state_dict() for r in rules],
            "random": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                       "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}})


def load_checkpoint(ckpt: Path, model, opt, sched, rules) -> tuple[dict, dict | None] | None:
    """Restore a :func:`save_checkpoint` directory into ``model``, ``opt``, ``sched`` and ``rules``.

    Returns ``(state, best_state)`` (``best_state`` is ``None`` without ``best.safetensors``), or ``None`` when
    there is no checkpoint to resume from.
    """
    from safetensors.torch import load_file

    if not (ckpt.exists() and (ckpt / "state.json").exists()):
        return None
    st = json.loads((ckpt / "state.json").read_text())
    load_trainable(model, load_file(str(ckpt / "trainable.safetensors")))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    sched.load_state_dict(st["scheduler"])
    best_state = load_file(str(ckpt / "best.safetensors")) if (ckpt / "best.safetensors").exists() else None
    for r, rs in zip(rules, st["rules"]):
        r.load_state_dict(rs)
    return st, best_state


def restore_random(ckpt: Path, st: dict) -> None:
    """Set the random generators to their states in the checkpoint ``ckpt`` (its ``state.json`` read as
    ``st``): called last before training resumes, so a resumed run draws what an uninterrupted one would."""
    from safetensors.torch import load_file

    if (ckpt / "rng.safetensors").exists():
        rng = load_file(str(ckpt / "rng.safetensors"))
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1) if f"cuda.{i}" in rng]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if "random" in st:
        py, npy = st["random"]["python"], st["random"]["numpy"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))
