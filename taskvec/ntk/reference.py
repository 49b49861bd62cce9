"""The slow reference kernel from NTK-vector products, and the model outputs and derivatives it is built
from (ordinary forward, 2-D padding mask: independent of the exact path).

``K[:, j, :, b]`` is one JVP over all of ``inputs1`` along ``J(x'_j)ᵀ e_b``, itself one VJP (reverse mode
through the single example). Forward mode is :func:`taskvec.linearize.jvp_batch` (``ntk -> linearize``,
never the other way).
"""

from __future__ import annotations

import torch
from torch import nn

from ..linearize import jvp_batch
from ..modelfn import NTKError, _model_device, as_batch, eval_mode, reduce_outputs, wrap_model
from ..scopes import ParamSelection
from .result import convert_kernel
from .selection import _group_order, select_params


def model_outputs(model: nn.Module, inputs, output: str = "logits") -> torch.Tensor:
    """``(B, o)`` outputs through the model's ordinary forward (2-D padding mask)."""
    b = as_batch(inputs, _model_device(model))
    logits = wrap_model(model)(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
    return reduce_outputs(logits, b.get("labels"), output)


def jvp_outputs(model: nn.Module, inputs, delta_by_param_name: dict[str, torch.Tensor],
                output: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    """``f(θ0)`` and the forward-mode directional derivative ``J·Δ`` of the outputs.

    Args:
        model: task model at θ0 (eager attention: SDPA has no forward-mode AD on CPU).
        inputs: tokenised batch (dict or list of dicts).
        delta_by_param_name: parameter name (as in ``model.named_parameters()``) -> direction of the same
            shape (entries outside a selection should be zero; parameters not named have zero direction).
        output: ``"logits"`` | ``"margin"`` | ``"loss"``.

    Returns:
        ``(f0, jvp)``, both ``(B, o)`` in the model's dtype, detached.
    """
    named = dict(model.named_parameters())
    missing = [n for n in delta_by_param_name if n not in named]
    if missing:
        raise NTKError(f"delta names parameters the model lacks: {missing[:5]}; names look like "
                       + ", ".join(list(named)[:5]))
    for n, d in delta_by_param_name.items():
        if d.shape != named[n].shape:
            raise NTKError(f"delta for {n} has shape {tuple(d.shape)}, parameter has {tuple(named[n].shape)}")
    b = as_batch(inputs, _model_device(model))
    f0, jd, _ = jvp_batch(model, b, delta_by_param_name, output=output, keep_dtype=True)
    return f0, jd


def output_gradient(model: nn.Module, inputs, index: int, out: int, sels: list[ParamSelection],
                    output: str = "logits") -> dict[str, dict[str, torch.Tensor]]:
    """``∂f_out(x_index)/∂θ`` restricted to ``sels``: group -> {param name -> masked full-shape gradient}.

    Computed by reverse mode through the ordinary forward on the single example (the VJP with ``e_out``).
    """
    b = as_batch(inputs, _model_device(model))
    sub = {k: v[index:index + 1] for k, v in b.items()}
    named = dict(model.named_parameters())
    names = list(dict.fromkeys(s.name for s in sels))
    with eval_mode(model), torch.enable_grad():
        ps = [named[n] for n in names]
        req = [p.requires_grad for p in ps]
        for p in ps:
            p.requires_grad_(True)
        try:
            y = model_outputs(model, sub, output)[0, out]
            grads = dict(zip(names, torch.autograd.grad(y, ps, allow_unused=True)))
        finally:
            for p, r in zip(ps, req):
                p.requires_grad_(r)
    res: dict[str, dict[str, torch.Tensor]] = {}
    for s in sels:
        g = grads[s.name]
        g = torch.zeros_like(named[s.name]) if g is None else g
        masked = g * s.mask(g.device).to(g.dtype)
        d = res.setdefault(s.group, {})
        d[s.name] = d[s.name] + masked if s.name in d else masked
    return res


def _reference(model1, model2, sels1, b1, b2, kind, want_groups, output, o1, o2):
    """``(kernel, groups)`` from NTK-vector products: for each column ``(j, b)`` one VJP on model2's example
    ``j`` and one JVP per group (or one along the whole gradient) over all of ``b1``."""
    n1, n2 = b1["input_ids"].shape[0], b2["input_ids"].shape[0]
    groups = _group_order(sels1)
    full = {g: torch.zeros((n1, n2, o1, o2), dtype=torch.float64) for g in groups}
    sels2 = select_params(model2, sels1) if model2 is not model1 else sels1
    if not want_groups:
        full = {"all": full[groups[0]]}
    for j in range(n2):
        for bo in range(o2):
            grad = output_gradient(model2, b2, j, bo, sels2, output)
            if not want_groups:  # one JVP along the whole gradient
                tot: dict[str, torch.Tensor] = {}
                for d in grad.values():
                    for name, v in d.items():
                        tot[name] = tot[name] + v if name in tot else v
                grad = {"all": tot}
            for g in full:
                _, col = jvp_outputs(model1, b1, grad[g], output)  # (n1, o1)
                full[g][:, j, :, bo] = col.double().cpu()
    kernel = sum(full.values())
    out_groups = {g: convert_kernel(v, kind) for g, v in full.items()} if want_groups else {}
    return convert_kernel(kernel, kind), out_groups
