"""The public entry point :func:`empirical_ntk`: options checked, then one of the modes (exact, sketch,
reference) — see the package docstring of :mod:`taskvec.ntk`."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..modelfn import OUTPUTS, NTKError, _model_device, as_batch, eval_mode, tf32_disabled
from .distributed import _Dist, _dist_context, _exact_distributed
from .engines import _default_chunk, _Jacobian
from .gram import _kernel_shape
from .reference import _reference
from .result import KERNELS, NTKResult, kernel_matrix
from .schedules import Schedule, _exact_single, _fmt_bytes, default_memory_budget, parse_bytes
from .selection import _params_label, select_params
from .sketch import Projector, _sketch_kernel

MODES = ("exact", "sketch", "reference")


def _check_options(mode: str, kernel: str, output: str, schedule: str) -> None:
    if schedule not in tuple(s.value for s in Schedule):
        raise NTKError(f"unknown schedule {schedule!r}; valid: {', '.join(s.value for s in Schedule)}")
    if mode not in MODES:
        raise NTKError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if kernel not in KERNELS:
        raise NTKError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if output not in OUTPUTS or output == "token_logits":
        valid = ", ".join(o for o in OUTPUTS if o != "token_logits")
        raise NTKError(f"unknown kernel output {output!r}; valid: {valid} (per-token logits are too wide for a "
                       "kernel: use loglik)" if output == "token_logits" else
                       f"unknown output {output!r}; valid: {valid}")


def _check_cross(model1, model2, sels1, sels2):
    s1 = [(s.name, s.group, s.shape, s.dim, s.ranges) for s in sels1]
    s2 = [(s.name, s.group, s.shape, s.dim, s.ranges) for s in sels2]
    if s1 != s2:
        raise NTKError("cross-task kernel: the two models' parameter selections differ "
                       f"({len(s1)} vs {len(s2)} selections; first difference: "
                       f"{next((a, b) for a, b in zip(s1 + [None] * len(s2), s2 + [None] * len(s1)) if a != b)})")
    if model2 is model1:
        return
    n1, n2 = dict(model1.named_parameters()), dict(model2.named_parameters())
    for s in sels1:
        a, b = n1[s.name].detach(), n2[s.name].detach()
        if a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            raise NTKError(f"cross-task kernel: parameter {s.name} differs between the two models; both "
                           "Jacobians must be taken at the same θ0 (same base model, different heads only)")


def _check_sizes(kernel: str, groups: bool, jf1: _Jacobian, n1: int, n2: int, o1: int, o2: int) -> None:
    """Same output count on both sides unless full; the kernel (and group kernels) fit in host memory."""
    if kernel != "full" and o1 != o2:
        raise NTKError(f"kernel={kernel!r} needs the same number of outputs on both sides (got {o1} and "
                       f"{o2}: tasks with different label sets); use kernel='full' or output='margin'/'loss'")
    need = math.prod(_kernel_shape(kernel, n1, n2, o1, o2)) * 8 * (1 + (len(jf1.groups) if groups else 0))
    cpu_budget = default_memory_budget("cpu") / 0.4 * 0.8
    if need > cpu_budget:
        raise NTKError(f"the kernel{' and its group kernels' if groups else ''} need {_fmt_bytes(need)} of "
                       f"host memory (available ~{_fmt_bytes(cpu_budget)}); use groups=False, "
                       "kernel='trace', fewer examples, or mode='sketch' and work with the features")


def _exact(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric, kind, want_groups, budget, o1, o2,
           dist: _Dist | None = None, schedule: str = "auto"):
    """Exact kernel: sharded over the ranks of ``dist``, else in this process under ``schedule``."""
    if dist is not None:
        return _exact_distributed(jf1, jf2, b1, b2, symmetric, kind, want_groups, budget, o1, o2, dist)
    return _exact_single(jf1, jf2, b1, b2, symmetric, kind, want_groups, budget, o1, o2, schedule)


def empirical_ntk(model: nn.Module, inputs1, inputs2=None, params="qkv", output: str = "logits",
                  mode: str = "exact", kernel: str = "full", *, model2: nn.Module | None = None,
                  groups: bool = True, chunk_size: int | None = None, max_memory=None,
                  sketch_dim: int = 8192, seed: int = 0, projection: str = "rademacher",
                  block_rows: int | None = None, distributed: bool | None = None,
                  process_group=None, schedule: str = "auto") -> NTKResult:
    """Empirical NTK ``K = J1 J2ᵀ`` of a model's outputs with respect to a parameter selection.

    Args:
        model: task model at θ0 (the pretrained backbone with its task head by default); eval mode is
            used for the computation (no dropout) and restored after.
        inputs1: tokenised batch (dict, or list of dicts) of ``n1`` examples: ``input_ids (n1, L)``,
            ``attention_mask (n1, L)``, optional ``token_type_ids``, and ``labels (n1,)`` (needed by
            ``output="margin"/"loss"``).
        inputs2: second batch (``n2`` examples) for a cross kernel ``K(X1, X2)``; ``None`` = ``inputs1``
            (symmetric, computed once and mirrored).
        params: selection (see :func:`select_params`): scope string (default ``"qkv"``), ``"lora"``,
            ``"re:<regex>"``, names, a predicate, or selections.
        output: ``"logits"`` (o = C), ``"margin"`` or ``"loss"`` (o = 1).
        mode: ``"exact"`` | ``"sketch"`` | ``"reference"`` (see the :mod:`taskvec.ntk` docstring).
        kernel: ``"full"`` ``(n1, n2, o1, o2)`` | ``"trace"`` ``(n1, n2)`` = average over outputs |
            ``"diagonal"`` ``(n1, n2, o)``.
        model2: model for ``inputs2`` in a cross-task kernel (same θ0 on the selection, its own head);
            default ``model``.
        groups: also return each parameter group's kernel (exact/reference: free; sketch: stores
            ``n·o·k`` features per group).
        chunk_size: examples per gradient call (default 256 on CUDA, 32 on CPU).
        max_memory: bytes (or "16GB") the exact path may hold in Jacobians; default
            :func:`default_memory_budget`.
        sketch_dim, seed, projection, block_rows: sketch settings (``mode="sketch"``).
        distributed: spread the work over the ranks of ``torch.distributed`` (default ``None``: when it is
            initialised with more than one rank; ``False``: never; ``True``: required). exact: each rank
            computes the Jacobians of its shard of the examples and a balanced share of the Gram's blocks
            (shards of the other ranks are broadcast chunk by chunk), then the float64 kernels are summed
            over the ranks; sketch: features sharded and all-gathered. Every rank must pass the same
            inputs and model (on its own device: ``cuda:LOCAL_RANK`` with NCCL) and returns the same kernel.
            ``mode="reference"`` is not distributed.
        process_group: the group to use (default: the default group).
        schedule: how exact mode stores its work (single process; see
            :class:`~taskvec.ntk.schedules.Schedule`): ``"activations"`` keeps each selected
            layer's inputs and output gradients (per token ``d_in + o·d_out`` numbers) from one gradient pass
            per example and forms each parameter group's Jacobian rows from them when it multiplies that
            group; ``"jacobian"`` keeps Jacobian rows (``o·p`` numbers per example) and recomputes the ones
            that do not fit ``max_memory``; ``"auto"`` (default) takes ``"activations"`` when it needs fewer
            bytes than the whole Jacobian and fits the budget (the batched engine only). ``info["schedule"]``
            says which ran.

    Returns:
        :class:`NTKResult` with ``.kernel`` (float64, CPU) and ``.groups``.
    """
    t0 = time.perf_counter()
    _check_options(mode, kernel, output, schedule)
    symmetric = inputs2 is None and model2 is None
    model2 = model if model2 is None else model2
    sels1 = select_params(model, params)
    sels2 = select_params(model2, params) if model2 is not model else sels1
    _check_cross(model, model2, sels1, sels2)
    dev = _model_device(model)
    b1 = as_batch(inputs1, dev)
    b2 = b1 if inputs2 is None else as_batch(inputs2, _model_device(model2))
    chunk = chunk_size or _default_chunk(dev)
    jf1 = _Jacobian(model, sels1, output, chunk)
    jf2 = jf1 if model2 is model else _Jacobian(model2, sels2, output, chunk)
    n1, n2 = b1["input_ids"].shape[0], b2["input_ids"].shape[0]
    info: dict = {}
    d = _dist_context(distributed, process_group, dev) if mode != "reference" else None
    with tf32_disabled(), eval_mode(model, model2), torch.no_grad():
        o1, o2 = jf1.num_outputs(b1), jf2.num_outputs(b2)
        _check_sizes(kernel, groups, jf1, n1, n2, o1, o2)
        if mode == "reference":
            K, G = _reference(model, model2, sels1, b1, b2, kernel, groups, output, o1, o2)
        elif mode == "exact":
            budget = parse_bytes(max_memory) if max_memory is not None else default_memory_budget(dev)
            acc, info = _exact(jf1, jf2, b1, b2, symmetric, kernel, groups, budget, o1, o2, dist=d,
                               schedule=schedule)
            K, G = acc.kernel, acc.groups
        else:
            proj = Projector(sels1, sketch_dim, seed, projection, block_rows)
            K, G, info = _sketch_kernel(jf1, jf2, b1, b2, symmetric, kernel, groups, o1, o2, proj, d)
    if symmetric:
        M = kernel_matrix(K, kernel)
        info["asymmetry"] = float((M - M.T).abs().max() / M.abs().max().clamp_min(1e-300))
    return NTKResult(K, G, kernel, output, mode, _params_label(params), n1, n2, o1, o2, jf1.p,
                     dict(jf1.group_sizes), symmetric, sketch_dim if mode == "sketch" else None,
                     seed if mode == "sketch" else None, projection if mode == "sketch" else None,
                     time.perf_counter() - t0, info)
