"""Parameter selections of a kernel: which tensors (and which of their entries) the Jacobian is taken over."""

from __future__ import annotations

import torch
from torch import nn

from ..scopes import ParamSelection, ScopeError, lora_selection, resolve_scope


def select_params(model: nn.Module, params="qkv") -> list[ParamSelection]:
    """Resolve ``params`` to parameter selections of ``model``.

    ``params`` is a scope string (``"qkv"``, ``"attention"``, ``"full"``, ``"re:<regex>"``, ...: see
    :mod:`taskvec.scopes`), ``"lora"`` (the LoRA adapters of a peft model), a list of parameter names,
    a predicate ``name -> bool``, or a list of :class:`ParamSelection`. A filter matching nothing raises
    :class:`~taskvec.scopes.ScopeError` naming what exists.
    """
    if isinstance(params, str):
        return lora_selection(model) if params.strip().lower() == "lora" else resolve_scope(model, params)
    named = dict(model.named_parameters())
    if callable(params):
        sel = [ParamSelection(n, n, None, tuple(p.shape)) for n, p in named.items() if params(n)]
        if not sel:
            raise ScopeError("parameter predicate matches no parameter; names look like: "
                             + ", ".join(list(named)[:8]) + ", ...")
        return sel
    items = list(params)
    if items and all(isinstance(s, ParamSelection) for s in items):
        missing = [s.name for s in items if s.name not in named]
        if missing:
            raise ScopeError(f"selections name parameters that {type(model).__name__} lacks: {missing[:5]}")
        return items
    missing = [n for n in items if n not in named]
    if missing or not items:
        raise ScopeError(f"parameter names {missing[:5] or items} not in the model; names look like: "
                         + ", ".join(list(named)[:8]) + ", ...")
    return [ParamSelection(n, n, None, tuple(named[n].shape)) for n in items]


def _group_order(sels: list[ParamSelection]) -> list[str]:
    out: list[str] = []
    for s in sels:
        if s.group not in out:
            out.append(s.group)
    return out


def _take(sel: ParamSelection, t: torch.Tensor, lead: int) -> torch.Tensor:
    """Selected entries of ``t`` (``lead`` leading batch dims + the parameter shape), flattened: (*lead, p_s)."""
    if not sel.is_whole:
        t = torch.index_select(t, sel.dim + lead, sel.index().to(t.device))
    return t.reshape(*t.shape[:lead], -1)


def _params_label(params) -> str:
    return params if isinstance(params, str) else "custom"
