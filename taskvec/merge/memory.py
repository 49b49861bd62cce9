"""Merging task vectors in memory: the registered methods applied to ``{name: Δ}`` dicts, no files.

Validation (:mod:`taskvec.validation`) predicts and measures merges without writing them to disk; it needs
the merged delta Δ of a method over the run's task vectors. :func:`merge_vectors` computes it with the same
per-tensor parameter expansion as the streaming engine (:func:`taskvec.merge.params.expand`: layer
position, gradients, filters, per-tensor seeds), so a merge predicted here and one written by
``taskvec merge`` with the same parameters are the same merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .methods import MergeError, get_method
from .params import LAYER_INDEX, expand, layer_position


@dataclass
class MergeSpec:
    """One merge to predict and measure: a registered method of :mod:`taskvec.merge` (or validation's
    ``ntk_aware``) and its parameters (``lambda``, ``density``, ...), under a display ``name``."""

    name: str
    method: str
    params: dict = field(default_factory=dict)


def _num_layers(names) -> int:
    layers = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))]
    return max(layers) + 1 if layers else 1


def merge_vectors(vectors: Sequence, method: str, base_state: dict[str, torch.Tensor], **params) -> dict:
    """Merged delta ``{name: Δ}`` (float32, shapes of ``base_state``) of task vectors with a merge method.

    Args:
        vectors: T :class:`~taskvec.task_vector.TaskVector` (or objects with ``.deltas``); a tensor absent
            from a vector counts as zero there.
        method: a registered method name (:data:`taskvec.merge.METHODS`).
        base_state: θ0 as ``{name: tensor}``, holding every name the vectors change.
        **params: the method's parameters. Per-model ones (``weight``, ``density``, ``gamma``, ...) are a
            scalar for every vector or a list of T values, one per vector; global ones (``lambda``,
            ``seed``, ...) a scalar or a mergekit setting (gradient list, ``{filter, value}`` rules).
    Raises:
        MergeError: an unknown parameter, a list of the wrong length, or a tensor absent from the base.
    """
    m = get_method(method)
    T = len(vectors)
    unknown = set(params) - set(m.param_names) - ({"seed"} if m.random else set())
    if unknown:
        raise MergeError(f"unknown parameters {sorted(unknown)} for {method}; valid: {m.param_names}")
    model_params = [{} for _ in range(T)]
    global_params = {}
    for p in m.params:
        v = params.get(p.name, p.default)
        if not p.per_model:
            global_params[p.name] = v
            continue
        if isinstance(v, (list, tuple)):
            if len(v) != T:
                raise MergeError(f"{method}: parameter {p.name!r} has {len(v)} values for {T} task vectors")
            for i in range(T):
                model_params[i][p.name] = v[i]
        else:
            for i in range(T):
                model_params[i][p.name] = v
    if m.random:
        global_params["seed"] = int(params.get("seed", 0))
    names = sorted(set().union(*[v.deltas for v in vectors]))
    missing = [n for n in names if n not in base_state]
    if missing:
        raise MergeError(f"tensor {missing[0]!r} of a task vector is not in the base model "
                         f"({len(missing)} such tensors)")
    L = _num_layers(base_state)
    out = {}
    for name in names:
        base = base_state[name].float()
        deltas = [v.deltas[name].float().clone() if name in v.deltas else torch.zeros_like(base) for v in vectors]
        weights, per_model, glob = expand(m, name, layer_position(name, L), model_params, global_params)
        out[name] = m(base, deltas, list(weights), **per_model, **glob)
    return out


__all__ = ["MergeSpec", "merge_vectors"]
