"""Per-tensor values of a merge method's parameters: layer position, gradients and filters, seeds.

One expansion for the streaming engine (:mod:`taskvec.merge.engine`) and for in-memory merges
(:mod:`taskvec.merge.memory`): a setting (scalar, gradient list, or ``{filter, value}`` rules) is
evaluated for a tensor name at its layer position; random methods get a seed derived from the run's
seed and the tensor name, so a tensor's random mask does not depend on the order tensors are merged in.
"""

from __future__ import annotations

import hashlib
import re

from .config import evaluate
from .methods import Method

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_position(name: str, num_layers: int) -> float:
    """t ∈ [0, 1] for gradients: layer i of L gives i/(L−1); every tensor outside the layers (embeddings,
    final norm, LM head) 0 — mergekit 0.1.5 reads the parameters of its pre- and post-weights at t = 0."""
    m = LAYER_INDEX.search(name)
    if m:
        return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0


def tensor_seed(seed: int, name: str) -> int:
    """Seed of tensor ``name`` for a merge seeded with ``seed`` (48 bits of SHA-256 of both)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:6], "little")


def expand(method: Method, name: str, t: float, model_params: list[dict], global_params: dict):
    """``(weights, per_model, params)`` of ``method`` for tensor ``name`` at layer position ``t``.

    Args:
        model_params: per input, its per-model settings (``{"weight": ..., "density": ...}``).
        global_params: the method's global settings (``lambda``, ``seed``, ...).
    Returns:
        weights: one float per input; per_model: ``{param: [one value per input]}`` without ``weight``;
        params: ``{param: value}``, with ``seed`` replaced by the tensor's own seed.
    """
    per_model = {}
    for mp in model_params:
        for k, setting in mp.items():
            v = evaluate(setting, name, t)
            per_model.setdefault(k, []).append(method.param(k).default if v is None else v)
    weights = per_model.pop("weight")
    params = {k: (method.param(k).default if (v := evaluate(s, name, t)) is None else v)
              for k, s in global_params.items()}
    if "seed" in params:
        params["seed"] = tensor_seed(params["seed"], name)
    return weights, per_model, params


__all__ = ["LAYER_INDEX", "expand", "layer_position", "tensor_seed"]
