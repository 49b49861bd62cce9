"""A model as a function of its parameters: ``f(batch) -> (B, o)`` outputs, shared by the kernels and the
linearised model.

:mod:`taskvec.ntk` (empirical NTK) and :mod:`taskvec.linearize` (JVPs, VJPs) both evaluate a task model (or
a plain classifier with ``.logits``) on tokenised batches, reduce its class logits to per-example outputs
(logits, margin or loss) and call it functionally (``torch.func.functional_call``) under eval mode with
TF32 off. Those pieces live here, in a low module that imports nothing else from taskvec (the task-model
helpers ``pool`` and ``is_decoder`` of :mod:`taskvec.modeling` are looked up when a model is wrapped), so
that ``ntk -> linearize -> modelfn`` is a one-way chain.

* :class:`ModelFn` (:func:`wrap_model`): ``forward(input_ids, attention_mask, token_type_ids=None,
  mask4d=None) -> logits (B, C)``; parameters are named ``"m." + <model parameter name>``.
* :func:`reduce_outputs`: ``(B, C)`` logits -> ``(B, o)`` outputs (``logits`` | ``margin`` | ``loss``).
* :func:`as_batch` / :func:`_slice`: one right-padded batch dict; a sub-batch with common padding trimmed.
* :func:`additive_mask`: the ready 4-D additive mask that keeps transformers' mask helpers out of ``vmap``.
* :func:`eval_mode`, :func:`tf32_disabled`: the context managers every computation runs under.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .errors import TaskvecError

OUTPUTS = ("logits", "margin", "loss", "loglik", "token_logits")


class NTKError(TaskvecError, ValueError):
    """Bad kernel request: unknown option, mismatched tasks, memory that will not fit, non-finite gradient.

    Defined here because the model-function helpers (:func:`as_batch`, :func:`reduce_outputs`) raise it too;
    :class:`taskvec.ntk.NTKError` is this class.
    """


# --- context managers ------------------------------------------------------------------------------------


@contextmanager
def tf32_disabled():
    """Disable TF32 (cuBLAS and cuDNN) and use 'highest' fp32 matmul precision inside the block."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])


@contextmanager
def eval_mode(*models: nn.Module):
    """Put every model in eval mode (dropout off) inside the block; restore each one's training flag after,
    also when the block raises. A model passed twice is restored to its original flag."""
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(models, was):
            m.train(w)


# --- inputs ----------------------------------------------------------------------------------------------

_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def as_batch(inputs, device=None) -> dict[str, torch.Tensor]:
    """One tokenised batch from a dict or a list of dicts (right-padded to a common length with mask 0).

    Keys used: ``input_ids (n, L)``, ``attention_mask (n, L)``, optional ``token_type_ids (n, L)`` and
    ``labels (n,)``; others are dropped.
    """
    if isinstance(inputs, dict):
        parts = [inputs]
    else:
        parts = list(inputs)
    if not parts:
        raise NTKError("no inputs")
    for i, p in enumerate(parts):
        if "input_ids" not in p or "attention_mask" not in p:
            raise NTKError(f"inputs batch {i} lacks input_ids/attention_mask (keys: {sorted(p)})")
    L = max(int(p["input_ids"].shape[1]) for p in parts)
    out: dict[str, list] = {}
    keys = [k for k in _KEYS if all(k in p and p[k] is not None for p in parts)]
    for p in parts:
        for k in keys:
            v = torch.as_tensor(p[k])
            if (k != "labels" or v.dim() == 2) and v.shape[1] < L:  # per-token LM labels pad with -100
                v = torch.nn.functional.pad(v, (0, L - v.shape[1]), value=-100 if k == "labels" else 0)
            out.setdefault(k, []).append(v)
    batch = {k: torch.cat(v) for k, v in out.items()}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def _slice(batch: dict, idx) -> dict:
    """Examples ``idx`` of ``batch``, with the padding columns masked in all of them trimmed."""
    sub = {k: v[idx] for k, v in batch.items()}
    m = sub["attention_mask"]
    if m.ndim == 2 and m.shape[1] > 0:
        used = m.bool().any(0).nonzero()
        last = int(used.max()) + 1 if used.numel() else 1
        for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
            if k in sub and (k != "labels" or sub[k].dim() == 2):  # per-token LM labels are trimmed too
                sub[k] = sub[k][:, :last]
    return sub


# --- the model function ------------------------------------------------------------------------------------


def _is_decoder(model: nn.Module) -> bool:
    from .modeling import is_decoder

    cfg = getattr(model, "config", None)
    return cfg is not None and is_decoder(cfg)


def additive_mask(mask2d: torch.Tensor, decoder: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask from a 2-D padding mask ``(B, L)``.

    Returns ``(B, 1, 1, L)`` for encoders and ``(B, 1, L, L)`` (causal and padding) for decoders, with 0
    where attention is allowed and ``finfo(dtype).min`` elsewhere: the form transformers passes through
    untouched to eager attention.
    """
    allowed = mask2d.bool()[:, None, None, :]
    if decoder:
        L = mask2d.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=mask2d.device).tril()
        allowed = allowed & causal[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask2d.device).masked_fill(~allowed,
                                                                                        torch.finfo(dtype).min)


def reduce_outputs(logits: torch.Tensor, labels: torch.Tensor | None, output: str) -> torch.Tensor:
    """Model outputs per example, ``(B, o)``, from class logits ``(B, C)``.

    ``logits``: the logits (o = C); ``margin``: ``f_y − max_{c≠y} f_c`` (o = 1); ``loss``: the
    cross-entropy ``−log softmax(f)_y`` (o = 1); ``loglik`` (LM task models, :mod:`taskvec.lm_objective`:
    next-token logits ``(B, L, V)`` and labels ``(B, L)`` with -100 off the continuation): the example's
    summed log-likelihood ``Σ_t log p(y_t | y_<t)`` over its scored tokens, in nats (o = 1);
    ``token_logits`` (LM task models): the next-token logits themselves, ``(B, L, V)``.
    """
    if output == "token_logits":
        if logits.dim() != 3:
            raise NTKError("output='token_logits' is the output of LM task models ((B, L, V) next-token logits); "
                           "use logits, margin or loss")
        return logits
    if output == "logits":
        if logits.dim() == 3:
            raise NTKError("an LM task model's outputs are per token: use output='loglik' (the example's "
                           "log-likelihood)")
        return logits
    if labels is None:
        raise NTKError(f"output={output!r} needs 'labels' in the inputs")
    if output == "loglik" or logits.dim() == 3:
        if logits.dim() != 3 or labels.dim() != 2:
            raise NTKError(f"output={output!r}: 'loglik' is the output of LM task models ((B, L, V) logits, "
                           f"(B, L) labels); {'use loglik' if logits.dim() == 3 else 'use logits, margin or loss'}")
        keep = labels != -100
        lf = logits if logits.dtype == torch.float64 else logits.float()  # at least float32
        lp = torch.log_softmax(lf, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (lp * keep).sum(-1, keepdim=True)
    y = labels.long().reshape(-1, 1)
    if output == "margin":
        if logits.shape[-1] < 2:
            raise NTKError("output='margin' needs at least 2 classes")
        true = logits.gather(-1, y)
        is_true = torch.arange(logits.shape[-1], device=logits.device)[None, :] == y  # vmap-safe one-hot
        other = logits.masked_fill(is_true, float("-inf")).amax(-1, keepdim=True)
        return true - other
    if output == "loss":
        return -torch.log_softmax(logits, -1).gather(-1, y)
    raise NTKError(f"unknown output {output!r}; valid: {', '.join(OUTPUTS)}")


class ModelFn(nn.Module):
    """``forward(input_ids, attention_mask, token_type_ids=None, mask4d=None) -> logits (B, C)``.

    Wraps a :class:`~taskvec.modeling.TaskModel` (backbone + head: the backbone gets ``mask4d`` when given,
    a ready additive mask that is vmap-safe, and pooling the 2-D mask) or any module returning logits (or an
    output with ``.logits``) from ``input_ids, attention_mask[, token_type_ids]``. The wrapped model is
    ``self.m``, so its parameters are ``"m." + name`` for ``torch.func.functional_call``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model
        self.task = all(hasattr(model, a) for a in ("backbone", "head", "spec"))
        self.decoder = _is_decoder(model.backbone if self.task else model)

    def forward(self, input_ids, attention_mask, token_type_ids=None, mask4d=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask if mask4d is None else mask4d}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if self.task:
            from .modeling import pool

            h = self.m.backbone(**kw).last_hidden_state
            return self.m.head(pool(h, attention_mask, self.m.spec.pooling), self.m.backbone)
        out = self.m(**kw)
        return out.logits if hasattr(out, "logits") else out


def wrap_model(model: nn.Module) -> ModelFn:
    """``model`` as a :class:`ModelFn` (a new wrapper: it holds no state of its own)."""
    return ModelFn(model)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
