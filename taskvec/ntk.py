"""Empirical neural tangent kernel of a task model with respect to a parameter selection.

Definitions follow ``THEORY.md`` ("Empirical NTK"). For inputs ``x_1..x_n`` and a model with ``o`` outputs
per example, the Jacobian rows are ``J(x_i) = ∂f(x_i; θ0)/∂θ_sel ∈ R^{o × p}`` (``p`` selected parameter
entries, default W_Q, W_K, W_V of every layer), and

    K[i, j, a, b] = <J(x_i)[a], J(x'_j)[b]>                                   (kernel="full")

Shapes of :attr:`NTKResult.kernel` (always ``torch.float64``, on the CPU):

==============  =====================  =====================================================
``kernel=``     shape                  entry
==============  =====================  =====================================================
``"full"``      ``(n1, n2, o1, o2)``   ``K[i, j, a, b]``
``"trace"``     ``(n1, n2)``           ``(1/o) · Σ_a K[i, j, a, a]``  (the *average*, not the sum)
``"diagonal"``  ``(n1, n2, o)``        ``K[i, j, a, a]``
==============  =====================  =====================================================

Outputs (``output=``): ``"logits"`` (``o`` = number of classes), ``"margin"`` (``o = 1``: true-class logit
minus the largest other logit), ``"loss"`` (``o = 1``: per-example cross-entropy). The last two need
``labels`` in the inputs.

Modes (``mode=``), all tested to agree (``tests/test_ntk.py``):

``"exact"``
    per-example Jacobians in chunks, from one batched forward and one backward per output when every
    selected tensor is a linear layer's weight or bias (per-example weight gradients from the layers' inputs
    and output gradients; checked on the first chunk against autograd), else from ``torch.func`` (``vmap``
    of ``jacrev`` of ``functional_call``). The Gram is accumulated in float64 tile by tile: float32 rows are
    multiplied in float32 over column blocks of at most ``2^18`` entries, each block's product added in
    float64; float64 rows in float64. What is kept between the gradient passes and the Gram
    (``schedule=``): with the batched engine, by default, each selected layer's inputs and output gradients
    (``"activations"``: per token ``d_in + o·d_out`` numbers instead of ``o·d_in·d_out`` per example), from
    which each parameter group's rows are formed when that group is multiplied; otherwise the Jacobian rows
    (``"jacobian"``), and when those do not fit in ``max_memory`` they are processed in row blocks and the
    column chunks recomputed, so memory stays bounded (time grows by about ``n / (2·block)`` extra gradient
    passes).
``"sketch"``
    the same per-example Jacobians projected on the fly, ``φ(x) = J(x) S / √k`` with ``S`` a ``p × k``
    Rademacher (default) or Gaussian matrix generated block by block from a seed derived from
    ``(seed, parameter name, group, block)``: ``S`` is never materialised, and every task sketched with the
    same seed (and device type) uses the same ``S``, so cross-task inner products are comparable.
    ``E[φφᵀ] = K``; the relative error decays as ``1/√k``.
``"reference"``
    NTK-vector products (a VJP to get ``J(x'_j)ᵀ e_b``, then a JVP over all of ``inputs1``): slow, for
    tests. Uses the model's ordinary forward (2-D padding mask), independently of the exact path.

The ``vmap`` path avoids the data-dependent mask helpers of transformers 5 (see ``RESOURCES.md``) by
passing a ready additive 4-D mask (``(1, 1, 1, L)`` per example for encoders, causal ``(1, 1, L, L)``
for decoders), which transformers returns as it is; pooling still uses the 2-D mask. Padding columns that
are masked in every example of a chunk are trimmed (exactly: they receive zero attention).

Numerics: model in its own dtype (fp32 by default; tests use float64), TF32 disabled while computing,
Grams accumulated in float64, results moved to the CPU.

With ``torch.distributed`` initialised (``torchrun``), exact kernels and sketched features are sharded over
the ranks and every rank returns the whole result (``_exact_distributed``, ``docs/ntk.md``).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import TaskvecError
from .scopes import ParamSelection, ScopeError, lora_selection, resolve_scope

OUTPUTS = ("logits", "margin", "loss")
MODES = ("exact", "sketch", "reference")
KERNELS = ("full", "trace", "diagonal")
PROJECTIONS = ("rademacher", "gaussian")


class NTKError(TaskvecError, ValueError):
    """Bad kernel request: unknown option, mismatched tasks, memory that will not fit, non-finite gradient."""


# --- small helpers -------------------------------------------------------------------------------------


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
def _eval_mode(*models):
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(models, was):
            m.train(w)


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1024 or unit == "TB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TB"


def parse_bytes(x) -> int:
    """``16e9``, ``"16GB"``, ``"512MiB"`` -> bytes."""
    if isinstance(x, (int, float)):
        return int(x)
    s = str(x).strip().upper().replace(" ", "")
    units = {"TIB": 1024**4, "GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "TB": 1e12, "GB": 1e9,
             "MB": 1e6, "KB": 1e3, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * f)
    return int(float(s))


def default_memory_budget(device) -> int:
    """Bytes the exact path may use for stored Jacobians: 60% of free GPU memory, or 40% of available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.6 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.4 * int(line.split()[1]) * 1024)
    except OSError:  # pragma: no cover
        pass
    return 4 * 1024**3


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
            if k != "labels" and v.shape[1] < L:
                v = torch.nn.functional.pad(v, (0, L - v.shape[1]), value=0)
            out.setdefault(k, []).append(v)
    batch = {k: torch.cat(v) for k, v in out.items()}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def _slice(batch: dict, idx) -> dict:
    sub = {k: v[idx] for k, v in batch.items()}
    m = sub["attention_mask"]
    if m.ndim == 2 and m.shape[1] > 0:
        used = m.bool().any(0).nonzero()
        last = int(used.max()) + 1 if used.numel() else 1
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            if k in sub:
                sub[k] = sub[k][:, :last]
    return sub


# --- the per-example function ------------------------------------------------------------------------------


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
    cross-entropy ``−log softmax(f)_y`` (o = 1).
    """
    if output == "logits":
        return logits
    if labels is None:
        raise NTKError(f"output={output!r} needs 'labels' in the inputs")
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


class _Wrapped(nn.Module):
    """``forward(batch) -> logits (B, C)`` through a 4-D additive mask (vmap-safe) or the model's own forward."""

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


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _linear_kind(module: nn.Module) -> str | None:
    """``"linear"`` (``y = x Wᵀ + b``, W ``(out, in)``), ``"conv1d"`` (transformers' GPT-2 ``Conv1D``:
    ``y = x W + b``, W ``(in, out)``) or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.ndim == 2:
        return "conv1d"
    return None


class _Jacobian:
    """Per-example Jacobians of one model's outputs with respect to a selection, chunk by chunk.

    Two engines compute the same rows (``self.engine``):

    ``"batched"``
        when every selected tensor is the weight or bias of a linear layer (``nn.Linear``, GPT-2
        ``Conv1D``, peft LoRA factors) used by no other module: one ordinary batched forward and, per
        output, one backward to the *outputs* of those layers (no weight gradients), then per-example
        weight gradients ``Σ_t g_{i,t} a_{i,t}ᵀ`` from each layer's saved inputs ``a`` and output gradients
        ``g`` (a batched matmul). Examples are independent in eval mode, so row ``i`` is exactly example
        ``i``'s gradient. Checked once per instance, on the first chunk: the per-example gradients must sum
        to autograd's batch gradient (a layer used in some other way, e.g. its weight read functionally,
        fails the check and switches the engine to ``"vmap"``).
    ``"vmap"``
        ``vmap(jacrev(functional_call))`` of the single-example function: any selection.
    """

    def __init__(self, model: nn.Module, sels: list[ParamSelection], output: str, chunk_size: int,
                 engine: str = "auto"):
        self.model, self.sels, self.output = model, sels, output
        self.wrapped = _Wrapped(model)
        self.names = list(dict.fromkeys(s.name for s in sels))
        named = dict(model.named_parameters())
        self.params = {"m." + n: named[n].detach() for n in self.names}
        self.dtype, self.device = _model_dtype(model), _model_device(model)
        self.groups = _group_order(sels)
        self.group_sizes = {g: sum(s.numel for s in sels if s.group == g) for g in self.groups}
        self.p = sum(self.group_sizes.values())
        self.chunk_size = max(1, int(chunk_size))
        if engine not in ("auto", "batched", "vmap"):
            raise NTKError(f"unknown engine {engine!r}; valid: auto, batched, vmap")
        self._layers = self._linear_layers() if engine != "vmap" else None
        if engine == "batched" and self._layers is None:
            raise NTKError("engine='batched' needs every selected tensor to be a weight/bias of a linear layer")
        self.engine = "batched" if self._layers is not None else "vmap"
        self._checked = False
        self.fallback_reason: str | None = None

    def _linear_layers(self):
        """param name -> (module name, module, "weight"|"bias", kind) for every selected tensor, or None."""
        modules = dict(self.model.named_modules())
        counts: dict[int, int] = {}
        for _, prm in self.model.named_parameters(remove_duplicate=False):
            counts[id(prm)] = counts.get(id(prm), 0) + 1
        uses: dict[int, int] = {}
        for _, mod in self.model.named_modules(remove_duplicate=False):
            uses[id(mod)] = uses.get(id(mod), 0) + 1
        out = {}
        for n in self.names:
            mname, _, attr = n.rpartition(".")
            mod = modules.get(mname)
            kind = _linear_kind(mod) if mod is not None else None
            if kind is None or attr not in ("weight", "bias") or getattr(mod, attr) is None:
                return None
            if counts.get(id(getattr(mod, attr)), 0) != 1 or uses.get(id(mod), 0) != 1:
                return None  # tied or shared: other uses would be missed
            out[n] = (mname, mod, attr, kind)
        return out

    def num_outputs(self, batch: dict) -> int:
        with torch.no_grad():
            sub = _slice(batch, slice(0, 1))
            return int(reduce_outputs(self._logits_plain(sub), sub.get("labels"), self.output).shape[-1])

    def _logits_plain(self, sub):
        return self.wrapped(sub["input_ids"], sub["attention_mask"], sub.get("token_type_ids"))

    def _single(self, params, ex):
        ids = ex["input_ids"][None]
        m2 = ex["attention_mask"][None]
        tt = ex["token_type_ids"][None] if "token_type_ids" in ex else None
        logits = torch.func.functional_call(self.wrapped, params, (ids, m2, tt, ex["mask4d"][None]))
        y = ex["labels"][None] if "labels" in ex else None
        return reduce_outputs(logits, y, self.output)[0]

    def _vmap_chunk(self, sub) -> dict[str, torch.Tensor]:
        """param name -> (b, o, *shape) per-example Jacobians by vmap(jacrev)."""
        jac = torch.func.vmap(torch.func.jacrev(self._single), in_dims=(None, 0))(self.params, sub)
        return {n: jac["m." + n] for n in self.names}

    def _capture(self, sub, check: bool) -> dict | None:
        """One batched forward and one backward per output to the selected layers' outputs (no weight
        gradients): ``{"b", "o", "x": {module: [input (b, ..., d_in)] per call}, "g": [{(module, call): output
        gradient (b, ..., d_out)} per output]}``; ``check`` also verifies that the per-example gradients of
        output 0 sum to autograd's batch gradient. None when the layers are not used as plain per-example
        linear maps (see class docstring)."""
        b = sub["input_ids"].shape[0]
        layers = self._layers
        mods = {mname: (mod, kind) for mname, mod, _, kind in layers.values()}
        seen: dict[str, list] = {m: [] for m in mods}
        ok = [True]

        def hook_for(mname):
            def hook(mod, args, out):
                if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(out) \
                        or args[0].shape[:1] != (b,) or out.shape[:1] != (b,):
                    ok[0] = False
                else:
                    seen[mname].append((args[0].detach(), out))
            return hook

        handles = [mod.register_forward_hook(hook_for(m)) for m, (mod, _) in mods.items()]
        named = dict(self.model.named_parameters())
        ps = [named[n] for n in self.names]
        req = [p.requires_grad for p in ps]
        try:
            for p in ps:
                p.requires_grad_(True)
            with torch.enable_grad():
                logits = self.wrapped(sub["input_ids"], sub["attention_mask"], sub.get("token_type_ids"),
                                      sub["mask4d"])
                f = reduce_outputs(logits, sub.get("labels"), self.output)  # (b, o)
            for h in handles:
                h.remove()
            handles = []
            if not ok[0] or any(not v for v in seen.values()):
                return None
            keys = [(m, k) for m in mods for k in range(len(seen[m]))]
            outs = [seen[m][k][1] for m, k in keys]
            o = f.shape[1]
            cap = {"b": b, "o": o, "x": {m: [x for x, _ in v] for m, v in seen.items()},
                   "shape": {m: [y.shape[-1] for _, y in v] for m, v in seen.items()}, "g": []}
            batch_grad = None
            for a in range(o):
                wrt = outs + (ps if check and a == 0 else [])
                with torch.enable_grad():
                    fa = f[:, a].sum()
                gs = torch.autograd.grad(fa, wrt, retain_graph=a < o - 1, allow_unused=True)
                if check and a == 0:
                    batch_grad = dict(zip(self.names, gs[len(outs):]))
                cap["g"].append(dict(zip(keys, gs[: len(outs)])))
            seen.clear()  # the layer outputs (and with them the graph) are no longer needed
            del outs, f, logits
            if check:
                tol = 1e-9 if self.dtype == torch.float64 else 1e-3
                for n in self.names:
                    ref = batch_grad[n]
                    ref = torch.zeros_like(named[n]) if ref is None else ref
                    got = self._form_param(cap, n, outputs=[0])[:, 0].sum(0)
                    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(ref).all())):
                        continue  # a non-finite gradient is the data's fault: reported with its example later
                    err = float((got - ref).norm()) / max(float(ref.norm()), 1e-30)
                    if not err <= tol:
                        self.fallback_reason = (f"per-example gradients of {n} do not sum to the batch gradient "
                                                f"(relative difference {err:.1e})")
                        return None
            return cap
        finally:
            for h in handles:
                h.remove()
            for p, r in zip(ps, req):
                p.requires_grad_(r)

    def _form_param(self, cap: dict, n: str, outputs=None) -> torch.Tensor:
        """Per-example gradients ``(b, o, *shape)`` of parameter ``n`` from a capture: ``Σ_t g_{i,t} x_{i,t}ᵀ``
        (a batched matmul per layer call) for weights, ``Σ_t g_{i,t}`` for biases."""
        mname, _, attr, kind = self._layers[n]
        b = cap["b"]
        per = []
        for a in range(cap["o"]) if outputs is None else outputs:
            tot = None
            for k, x in enumerate(cap["x"][mname]):
                g = cap["g"][a][(mname, k)]
                if g is None:
                    continue
                g = g.reshape(b, -1, cap["shape"][mname][k])
                if attr == "bias":
                    t = g.sum(1)
                elif kind == "linear":
                    t = torch.bmm(g.transpose(1, 2), x.reshape(b, -1, x.shape[-1]))
                else:
                    t = torch.bmm(x.reshape(b, -1, x.shape[-1]).transpose(1, 2), g)
                tot = t if tot is None else tot + t
            if tot is None:
                tot = torch.zeros((b,) + tuple(self._layers[n][1].get_parameter(attr).shape), dtype=self.dtype,
                                  device=self.device)
            per.append(tot)
        return torch.stack(per, 1)

    def form_group(self, cap: dict, g: str) -> torch.Tensor:
        """Jacobian rows ``(b, o, p_g)`` of parameter group ``g`` from a capture (see :meth:`_capture`)."""
        parts = [_take(s, self._form_param(cap, s.name), 2) for s in self.sels if s.group == g]
        return (torch.cat(parts, -1) if len(parts) > 1 else parts[0]).contiguous()

    @staticmethod
    def capture_bytes(cap: dict) -> int:
        """Bytes a capture holds (layer inputs shared by several layers, e.g. Q/K/V, counted once)."""
        seen, tot = set(), 0
        ts = [x for v in cap["x"].values() for x in v] + [t for d in cap["g"] for t in d.values() if t is not None]
        for t in ts:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                tot += t.numel() * t.element_size()
        return tot

    def capture_chunk(self, batch: dict, idx: torch.Tensor) -> dict | None:
        """:meth:`_capture` of the examples ``idx`` (common padding trimmed); None, and the engine switched to
        ``"vmap"``, when the batched engine does not apply."""
        if self.engine != "batched":
            return None
        sub = _slice(batch, idx)
        sub["mask4d"] = additive_mask(sub["attention_mask"], self.wrapped.decoder, self.dtype)
        cap = self._capture(sub, check=not self._checked)
        self._checked = True
        if cap is None:
            self.engine = "vmap"
            self.fallback_reason = self.fallback_reason or "a selected layer is not applied per example"
        return cap

    def _batched_chunk(self, sub, check: bool) -> dict[str, torch.Tensor] | None:
        """param name -> (b, o, *shape) from one batched forward + one backward per output (see class
        docstring); None when the layers are not used as plain per-example linear maps."""
        cap = self._capture(sub, check)
        return None if cap is None else {n: self._form_param(cap, n) for n in self.names}

    def chunk(self, batch: dict, idx: torch.Tensor, offset_name: str = "inputs") -> dict[str, torch.Tensor]:
        """Jacobians of the examples ``idx`` (after trimming common padding): group -> ``(b, o, p_g)``."""
        sub = _slice(batch, idx)
        sub["mask4d"] = additive_mask(sub["attention_mask"], self.wrapped.decoder, self.dtype)
        jac = None
        if self.engine == "batched":
            jac = self._batched_chunk(sub, check=not self._checked)
            if jac is None:
                self.engine = "vmap"
                self.fallback_reason = self.fallback_reason or "a selected layer is not applied per example"
            self._checked = True
        if jac is None:
            jac = self._vmap_chunk(sub)
        out: dict[str, list] = {g: [] for g in self.groups}
        for s in self.sels:
            out[s.group].append(_take(s, jac[s.name], 2))
        del jac
        res = {g: (torch.cat(v, -1) if len(v) > 1 else v[0]).contiguous() for g, v in out.items()}
        for g, t in res.items():
            _check_finite(t, idx, offset_name, g)
        return res

    def plan(self, batch: dict, idx: torch.Tensor) -> list[torch.Tensor]:
        """Positions in ``idx`` (CPU) of each chunk :meth:`blocks` computes: examples of similar length
        together (less padding), ``chunk_size`` at a time."""
        lengths = batch["attention_mask"][idx.to(batch["attention_mask"].device)].sum(1)
        order = torch.argsort(lengths.cpu(), stable=True)
        return [order[a:a + self.chunk_size] for a in range(0, len(idx), self.chunk_size)]

    def blocks(self, batch: dict, idx: torch.Tensor, name: str = "inputs") -> Iterable[tuple[torch.Tensor, dict]]:
        """Yield ``(positions in idx, jacobian chunk)`` over ``idx`` in the chunks of :meth:`plan`."""
        for pos in self.plan(batch, idx):
            yield pos, self.chunk(batch, idx[pos.to(idx.device)], name)


# --- results --------------------------------------------------------------------------------------------------


@dataclass
class NTKResult:
    """An empirical NTK and how it was computed.

    Attributes:
        kernel: float64 CPU tensor, ``(n1, n2, o1, o2)`` (full), ``(n1, n2)`` (trace: the *average* over
            outputs) or ``(n1, n2, o)`` (diagonal).
        groups: group label (``"3.q"``) -> that group's kernel, same shape; they sum to ``kernel``
            exactly for exact/reference. For sketch each is an unbiased sketch of its group's kernel and
            their sum is unbiased for K, but it is not the sketched ``kernel`` (which also holds the
            cross-group terms ``<φ_g, φ_h>``, zero in expectation). Empty if not requested.
        kind, output, mode: the options used. params: the parameter spec (scope string or "custom").
        n1, n2, o1, o2: examples and outputs per side; p: selected parameter entries; group_sizes: p per group.
        sketch_dim, seed, projection: sketch settings (mode="sketch"). symmetric: inputs2 was None.
        seconds: wall time; info: extra counters (gradient passes, memory budget, ...).
    """

    kernel: torch.Tensor
    groups: dict
    kind: str
    output: str
    mode: str
    params: str
    n1: int
    n2: int
    o1: int
    o2: int
    p: int
    group_sizes: dict
    symmetric: bool
    sketch_dim: int | None = None
    seed: int | None = None
    projection: str | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def matrix(self) -> torch.Tensor:
        """The kernel as a 2-D float64 matrix: ``(n1·o1, n2·o2)`` (example-major) for full, ``(n1, n2)`` for
        trace; diagonal kernels are averaged over outputs first."""
        return kernel_matrix(self.kernel, self.kind)

    def meta(self) -> dict:
        """JSON-serialisable description (everything except tensors)."""
        return {k: getattr(self, k) for k in ("kind", "output", "mode", "params", "n1", "n2", "o1", "o2", "p",
                                              "group_sizes", "symmetric", "sketch_dim", "seed", "projection",
                                              "seconds", "info")} | {"groups_present": list(self.groups)}

    def save(self, path) -> None:
        """Write ``path`` (safetensors: ``kernel`` and ``group/<label>``) and ``path`` + ``.json`` (meta)."""
        from safetensors.torch import save_file

        from .io import atomic_file, write_json

        tensors = {"kernel": self.kernel.contiguous()}
        tensors.update({f"group/{g}": k.contiguous() for g, k in self.groups.items()})
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp))
        write_json(str(path) + ".json", self.meta())

    @classmethod
    def load(cls, path) -> "NTKResult":
        import json

        from safetensors.torch import load_file

        t = load_file(str(path))
        meta = json.loads(open(str(path) + ".json").read())
        meta.pop("groups_present", None)
        groups = {k[len("group/"):]: v for k, v in t.items() if k.startswith("group/")}
        return cls(kernel=t["kernel"], groups=groups, **meta)


def kernel_matrix(kernel: torch.Tensor, kind: str) -> torch.Tensor:
    """2-D view of a kernel: full ``(n1, n2, o1, o2)`` -> ``(n1·o1, n2·o2)``; trace as is; diagonal -> mean."""
    if kind == "full":
        n1, n2, o1, o2 = kernel.shape
        return kernel.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)
    if kind == "trace":
        return kernel
    if kind == "diagonal":
        return kernel.mean(-1)
    raise NTKError(f"unknown kernel kind {kind!r}; valid: {', '.join(KERNELS)}")


def convert_kernel(full: torch.Tensor, kind: str) -> torch.Tensor:
    """Full ``(n1, n2, o, o)`` kernel to ``kind`` (trace = average of the diagonal outputs)."""
    if kind == "full":
        return full
    d = torch.diagonal(full, dim1=2, dim2=3)  # (n1, n2, o)
    return d if kind == "diagonal" else d.mean(-1)


# --- Gram tiles ---------------------------------------------------------------------------------------------------


_P_BLOCK = 1 << 18  # columns per low-precision Gram product (each block's product is added in float64)


def _gram_into(out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, kind: str) -> torch.Tensor:
    """``out += `` the Gram of Jacobian rows ``A (a, o1, d)`` and ``B (b, o2, d)`` in the layout of ``kind``.

    ``out`` is float64. float64 rows are multiplied in float64 in one product; float32 (and 16-bit, upcast
    to float32) rows are multiplied in float32 over column blocks of at most ``_P_BLOCK`` entries, and
    each block's product is added to ``out`` in float64: no float64 copy of the rows is made, and the
    float32 round-off is that of a dot product of ``_P_BLOCK`` terms (measured ~1e-7 relative).
    """
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    a, o1, d = A.shape
    b, o2, _ = B.shape
    if kind == "trace":  # (1/o)·Σ over the o·d entries of each row
        A2, B2, scale = A.reshape(a, o1 * d), B.reshape(b, o2 * d), 1.0 / o1
    elif kind == "full":
        A2, B2, scale = A.reshape(a * o1, d), B.reshape(b * o2, d), 1.0
    else:
        A2 = B2 = None
    cols = d if A2 is None else A2.shape[1]
    step = cols if work == torch.float64 else _P_BLOCK
    for s in range(0, cols, step):
        e = min(cols, s + step)
        if kind == "diagonal":
            for c in range(o1):
                out[:, :, c] += (A[:, c, s:e].to(work) @ B[:, c, s:e].to(work).T).double()
            continue
        t = (A2[:, s:e].to(work) @ B2[:, s:e].to(work).T).double()
        if kind == "full":
            out += t.reshape(a, o1, b, o2).permute(0, 2, 1, 3)
        else:
            out += t.mul_(scale) if scale != 1.0 else t
    return out


def _gram_tile(A: torch.Tensor, B: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 Gram of Jacobian rows ``A (a, o1, d)`` and ``B (b, o2, d)`` in the layout of ``kind``."""
    shape = _kernel_shape(kind, A.shape[0], B.shape[0], A.shape[1], B.shape[1])
    return _gram_into(torch.zeros(shape, dtype=torch.float64, device=A.device), A, B, kind)


def _transpose_tile(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.permute(1, 0, 3, 2) if kind == "full" else t.transpose(0, 1)


def _kernel_shape(kind, n1, n2, o1, o2):
    return {"full": (n1, n2, o1, o2), "trace": (n1, n2), "diagonal": (n1, n2, o1)}[kind]


class _Accumulator:
    """Float64 kernel (and group kernels) on the CPU, filled tile by tile from Jacobian chunks."""

    def __init__(self, groups, kind, n1, n2, o1, o2, want_groups, tile: int = 128):
        shape = _kernel_shape(kind, n1, n2, o1, o2)
        self.kind, self.tile = kind, max(1, int(tile))
        self.kernel = torch.zeros(shape, dtype=torch.float64)
        self.groups = {g: torch.zeros(shape, dtype=torch.float64) for g in groups} if want_groups else {}

    def _tile(self, JA: dict, JB: dict, sa: slice, sb: slice):
        """float64 tile of the total (and of each group when kept) for rows ``sa`` of JA and ``sb`` of JB."""
        A0 = next(iter(JA.values()))[sa]
        B0 = next(iter(JB.values()))[sb]
        shape = _kernel_shape(self.kind, A0.shape[0], B0.shape[0], A0.shape[1], B0.shape[1])
        total = torch.zeros(shape, dtype=torch.float64, device=A0.device)
        parts = {}
        for g in JA:
            if self.groups:
                parts[g] = _gram_into(torch.zeros_like(total), JA[g][sa], JB[g][sb], self.kind)
                total += parts[g]
            else:  # all groups' products straight into one float64 tile
                _gram_into(total, JA[g][sa], JB[g][sb], self.kind)
        return total, parts

    def add(self, JA: dict, JB: dict, ia: torch.Tensor, ib: torch.Tensor, mirror: bool) -> None:
        """Kernel entries ``[ia, ib]`` (and ``[ib, ia]`` with ``mirror``) from Jacobians ``JA``, ``JB``.

        ``JA is JB`` (a diagonal block of a symmetric kernel): only tiles ``i ≤ j`` of ``self.tile`` rows are
        multiplied; the others are their transposes, and diagonal tiles are symmetrised exactly.
        """
        ia, ib = ia.cpu(), ib.cpu()
        if JA is not JB:
            total, parts = self._tile(JA, JB, slice(None), slice(None))
            self._put_all(total, parts, ia, ib, mirror)
            return
        m, T = len(ia), self.tile
        for i in range(0, m, T):
            for j in range(i, m, T):
                si, sj = slice(i, min(m, i + T)), slice(j, min(m, j + T))
                total, parts = self._tile(JA, JA, si, sj)
                if i == j:
                    total = 0.5 * (total + _transpose_tile(total, self.kind))
                    parts = {g: 0.5 * (t + _transpose_tile(t, self.kind)) for g, t in parts.items()}
                self._put_all(total, parts, ia[si], ia[sj], mirror or i != j)

    def _put_all(self, total, parts, ia, ib, mirror):
        self._put(self.kernel, total.cpu(), ia, ib, mirror)
        for g, t in parts.items():
            self._put(self.groups[g], t.cpu(), ia, ib, mirror)

    def _put(self, K, t, ia, ib, mirror):
        K[ia[:, None], ib[None, :]] = t
        if mirror:
            K[ib[:, None], ia[None, :]] = _transpose_tile(t, self.kind)


# --- distribution (torch.distributed) -----------------------------------------------------------------------


@dataclass
class _Dist:
    """A process group the examples are sharded over: ``rank`` of ``world``; ``device`` for collectives
    (``cuda:<current>`` with NCCL, the CPU with gloo)."""

    group: object
    rank: int
    world: int
    device: torch.device

    def _src(self, r: int) -> int:
        import torch.distributed as dist

        return r if self.group is dist.group.WORLD else dist.get_global_rank(self.group, r)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        import torch.distributed as dist

        x = t.to(self.device)
        dist.broadcast(x, self._src(src), group=self.group)
        return x

    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum ``t`` (a CPU tensor) over the ranks, in place."""
        import torch.distributed as dist

        x = t.to(self.device)
        dist.all_reduce(x, group=self.group)
        if x is not t:
            t.copy_(x.cpu())

    def gather_rows(self, local: torch.Tensor, shards: list[torch.Tensor], n: int) -> torch.Tensor:
        """Rows ``local[k]`` of example ``shards[rank][k]`` from every rank -> ``(n, ...)`` on ``local``'s device."""
        import torch.distributed as dist

        m = max(len(sh) for sh in shards)
        pad = torch.zeros((m,) + tuple(local.shape[1:]), dtype=local.dtype, device=self.device)
        pad[: local.shape[0]] = local.to(self.device)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        out = torch.empty((n,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        for sh, part in zip(shards, parts):
            out[sh.to(out.device)] = part[: len(sh)].to(out.device)
        return out


def _dist_context(distributed, process_group, device) -> _Dist | None:
    """The process group to shard over: ``process_group``, else the default group when ``distributed`` is
    True, or None (auto) and torch.distributed is initialised with more than one rank; None otherwise."""
    import torch.distributed as dist

    if distributed is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed or process_group is not None:
            raise NTKError("distributed=True (or a process_group) needs torch.distributed initialised: launch "
                           "with torchrun and call torch.distributed.init_process_group() first")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return None
    backend = str(dist.get_backend(group)).lower()
    device = torch.device(device)
    if "nccl" in backend and (device.type == "cuda" or "gloo" not in backend):
        comm = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    else:
        comm = torch.device("cpu")
    return _Dist(group, rank, world, comm)


def _shards(batch: dict, world: int) -> list[torch.Tensor]:
    """Example indices (CPU, ascending) of each rank: round-robin over the examples sorted by length, so that
    every rank gets a similar mix of lengths (and so of work)."""
    lengths = batch["attention_mask"].sum(1).cpu()
    order = torch.argsort(lengths, stable=True)
    return [order[r::world].sort().values for r in range(world)]


def _pack(J: dict, groups) -> torch.Tensor:
    return torch.cat([J[g].reshape(J[g].shape[0], -1) for g in groups], 1)


def _unpack(flat: torch.Tensor, groups, sizes: dict, o: int) -> dict:
    out, a = {}, 0
    for g in groups:
        w = o * sizes[g]
        out[g] = flat[:, a:a + w].reshape(flat.shape[0], o, sizes[g])
        a += w
    return out


# --- exact ------------------------------------------------------------------------------------------------------


def _sym_tile(device) -> int:
    # rows per tile of a diagonal block: tiles i <= j only (a quarter fewer products at two tiles);
    # CPU, MiniLM qkv, n = 256: 128-row tiles measured as fast as one product, 64-row tiles 2.6x slower
    return 512 if torch.device(device).type == "cuda" else 128


def _exact(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric, kind, want_groups, budget, o1, o2, dist=None,
           schedule: str = "auto"):
    n1 = b1["input_ids"].shape[0]
    n2 = n1 if symmetric else b2["input_ids"].shape[0]
    acc = _Accumulator(jf1.groups, kind, n1, n2, o1, o2, want_groups, tile=_sym_tile(jf1.device))
    itemsize = torch.finfo(jf1.dtype).bits // 8
    per_ex1 = o1 * jf1.p * itemsize
    chunk = jf1.chunk_size

    def work_for(c):  # one streamed chunk, and its per-parameter copy before the groups are concatenated
        return 2 * c * max(o1, o2) * jf1.p * itemsize

    if dist is not None:
        return _exact_distributed(jf1, jf2, b1, b2, symmetric, acc, budget, o1, o2, dist, work_for)
    # many outputs (o) make a default chunk too large for the budget: halve it until a block fits
    while chunk > 1 and int((budget - work_for(chunk)) // per_ex1) < chunk:
        chunk //= 2
    jf1.chunk_size = jf2.chunk_size = chunk
    work = work_for(chunk)
    rows = int((budget - work) // per_ex1)
    full_bytes = (n1 if symmetric else n1 + n2) * per_ex1
    if schedule != "jacobian" and jf1.engine == "batched" and jf2.engine == "batched":
        # stored activations are smaller than Jacobian rows for short sequences: one pass, no recomputation
        res = _exact_activations(jf1, jf2, b1, b2, symmetric, kind, want_groups, budget, o1, o2, full_bytes,
                                 force=schedule == "activations")
        if res is not None:
            return res
    if schedule == "activations":  # forced, it raises itself when it does not fit: the engine does not apply
        raise NTKError("schedule='activations' needs the batched engine (every selected tensor a weight or bias "
                       f"of a linear layer used once); here: {jf1.fallback_reason or 'not applicable'}")
    if rows < chunk:
        raise NTKError(
            f"exact kernel does not fit: the whole Jacobian needs {_fmt_bytes(full_bytes)} "
            f"({'n' if symmetric else 'n1+n2'} × o × p × {itemsize} B, p = {jf1.p:,}), and even one row block of "
            f"{chunk} examples plus a streamed chunk needs {_fmt_bytes(chunk * per_ex1 + work)} > budget "
            f"{_fmt_bytes(budget)}. Use mode='sketch' (features n × k), a smaller chunk_size, fewer parameters, "
            "or a larger max_memory.")
    rows = min(rows, n1)
    idx1 = torch.arange(n1, device=b1["input_ids"].device)
    passes = 0

    def fill_block(start, stop):
        """Stored Jacobians of rows [start, stop) of inputs1, in order: group -> (R, o1, p_g)."""
        nonlocal passes
        buf = {g: torch.empty((stop - start, o1, jf1.group_sizes[g]), dtype=jf1.dtype, device=jf1.device)
               for g in jf1.groups}
        for pos, J in jf1.blocks(b1, idx1[start:stop], "inputs1"):
            passes += len(pos)
            for g in J:
                buf[g][pos.to(jf1.device)] = J[g]
        return buf

    for start in range(0, n1, rows):
        stop = min(n1, start + rows)
        R = fill_block(start, stop)
        ia = torch.arange(start, stop)
        if symmetric:
            acc.add(R, R, ia, ia, mirror=False)
            rest = idx1[stop:]
            for pos, J in jf1.blocks(b1, rest, "inputs1"):
                passes += len(pos)
                acc.add(R, J, ia, rest[pos.to(rest.device)].cpu(), mirror=True)
        else:
            idx2 = torch.arange(n2, device=b2["input_ids"].device)
            for pos, J in jf2.blocks(b2, idx2, "inputs2"):
                passes += len(pos)
                acc.add(R, J, ia, pos.cpu(), mirror=False)
        del R
    return acc, {"schedule": "jacobian", "gradient_passes": passes, "row_block": rows, "memory_budget": budget,
                 "full_jacobian_bytes": full_bytes, "engine": jf1.engine}


def _check_finite(J: torch.Tensor, examples: torch.Tensor, name: str, group: str) -> None:
    """Raise naming the first example (index into ``name``) whose Jacobian rows ``J (b, o, p_g)`` are not finite."""
    bad = ~torch.isfinite(J).reshape(J.shape[0], -1).all(1)
    if bool(bad.any()):
        i = int(examples[int(bad.nonzero()[0])])
        raise NTKError(f"non-finite gradient for example {i} of {name} (parameter group {group}); "
                       "check that example's tokens/labels and the model's dtype")


def _tokens(batch: dict, idx: torch.Tensor) -> int:
    """Examples × trimmed length of one chunk (what a capture of it stores per token)."""
    m = batch["attention_mask"][idx.to(batch["attention_mask"].device)]
    used = m.bool().any(0).nonzero()
    return len(idx) * (int(used.max()) + 1 if used.numel() else 1)


def _exact_activations(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric, kind, want_groups, budget, o1, o2,
                       full_bytes: int, force: bool = False):
    """Exact kernel from stored layer activations, group by group — or None when it does not fit ``budget``.

    One batched forward + backward per chunk (every example's gradient pass exactly once) keeps, per
    selected layer, its inputs ``x (b, L, d_in)`` and the output gradients ``g (b, o, L, d_out)``: per token
    ``d_in`` (once per distinct input: Q, K and V share theirs) ``+ o·Σ d_out`` numbers instead of the
    Jacobian's ``o·Σ d_in·d_out`` per example (``schedule="auto"`` takes this path when that is smaller and
    fits; ``force`` takes it whenever it fits and raises otherwise). Then for each parameter group its Jacobian rows are formed
    from them (``Σ_t g xᵀ``, a batched matmul costing about ``L`` Gram entries per example) for a block of
    rows at a time and multiplied into a float64 device kernel (triangle tiles on diagonal blocks). The
    group Grams add up to the kernel in the order of the capture; it is put back in the input order once.
    """
    dev = jf1.device
    itemsize = torch.finfo(jf1.dtype).bits // 8
    idx1 = torch.arange(b1["input_ids"].shape[0], device=b1["input_ids"].device)
    idx2 = None if symmetric else torch.arange(b2["input_ids"].shape[0], device=b2["input_ids"].device)
    plans = [(jf1, b1, idx1, jf1.plan(b1, idx1))] + ([] if symmetric else [(jf2, b2, idx2, jf2.plan(b2, idx2))])
    rows0 = idx1[plans[0][3][0].to(idx1.device)]
    first = jf1.capture_chunk(b1, rows0)
    if first is None:
        return None
    per_token = jf1.capture_bytes(first) / _tokens(b1, rows0)
    tokens = sum(_tokens(b, idx[pos.to(idx.device)]) for _, b, idx, plan in plans for pos in plan)
    cap_bytes = per_token * tokens * max(o1, o2) / o1
    n1 = len(idx1)
    n2 = n1 if symmetric else len(idx2)
    kern = math.prod(_kernel_shape(kind, n1, n2, o1, o2)) * 8 * (2 if want_groups else 1)
    per_row = max(o1, o2) * max(jf1.group_sizes.values()) * itemsize
    free = budget - cap_bytes - kern
    if free < 2 * jf1.chunk_size * per_row:
        if force:
            raise NTKError(f"schedule='activations' does not fit: the stored activations need "
                           f"{_fmt_bytes(cap_bytes)}, the kernel {_fmt_bytes(kern)}, and two row blocks of "
                           f"{jf1.chunk_size} examples {_fmt_bytes(2 * jf1.chunk_size * per_row)} > budget "
                           f"{_fmt_bytes(budget)}. Use schedule='jacobian' (row blocks, recomputed), a larger "
                           "max_memory, or mode='sketch'.")
        return None
    if cap_bytes >= full_bytes and not force:
        return None
    R = n1 if symmetric and free >= n1 * per_row else max(jf1.chunk_size, int(free // (2 * per_row)))

    caps = []  # per side: [(positions in the input (CPU), capture)] in plan order
    for side, (jf, b, idx, plan) in enumerate(plans):
        got = []
        for c, pos in enumerate(plan):
            rows = idx[pos.to(idx.device)]
            cap = first if side == 0 and c == 0 else jf.capture_chunk(b, rows)
            if cap is None:  # cannot happen after the first chunk's check, but never trust it silently
                return None
            got.append((rows.cpu(), cap))
        caps.append(got)
    first = None
    if symmetric:
        caps.append(caps[0])

    def blocks(got, R):
        out, cur, start = [], [], 0
        for rows, cap in got:
            if cur and sum(len(r) for r, _ in cur) + len(rows) > R:
                out.append((start, cur))
                start += sum(len(r) for r, _ in cur)
                cur = []
            cur.append((rows, cap))
        if cur:
            out.append((start, cur))
        return out

    def form(jf, blk, g, name):
        J = torch.cat([jf.form_group(cap, g) for _, cap in blk], 0)
        _check_finite(J, torch.cat([r for r, _ in blk]), name, g)
        return J

    B1, B2 = blocks(caps[0], R), blocks(caps[1], R)
    shape = _kernel_shape(kind, n1, n2, o1, o2)
    Kd = torch.zeros(shape, dtype=torch.float64, device=dev)
    Gd = torch.zeros_like(Kd) if want_groups else None
    perm1 = torch.cat([r for r, _ in caps[0]])
    perm2 = torch.cat([r for r, _ in caps[1]])

    def unpermute(t):
        out = torch.empty(shape, dtype=torch.float64)
        out[perm1[:, None], perm2[None, :]] = t.cpu()
        return out

    T = _sym_tile(dev)
    groups_out = {}
    for g in jf1.groups:
        tgt = Gd.zero_() if want_groups else Kd
        for bi, (a0, blk) in enumerate(B1):
            JA = form(jf1, blk, g, "inputs1")
            a1 = a0 + JA.shape[0]
            if symmetric:
                m = JA.shape[0]
                for i in range(0, m, T):
                    for j in range(i, m, T):
                        si, sj = slice(a0 + i, a0 + min(m, i + T)), slice(a0 + j, a0 + min(m, j + T))
                        t = _gram_tile(JA[i:i + T], JA[j:j + T], kind)
                        if i == j:
                            tgt[si, si] += 0.5 * (t + _transpose_tile(t, kind))
                        else:
                            tgt[si, sj] += t
                            tgt[sj, si] += _transpose_tile(t, kind)
                later = B1[bi + 1:]
            else:
                later = B2
            for b0, blk2 in later:
                JB = form(jf1 if symmetric else jf2, blk2, g, "inputs1" if symmetric else "inputs2")
                b1_ = b0 + JB.shape[0]
                if symmetric:
                    t = _gram_tile(JA, JB, kind)
                    tgt[a0:a1, b0:b1_] += t
                    tgt[b0:b1_, a0:a1] += _transpose_tile(t, kind)
                else:
                    _gram_into(tgt[a0:a1, b0:b1_], JA, JB, kind)
                del JB
            del JA
        if want_groups:
            Kd += Gd
            groups_out[g] = unpermute(Gd)
    passes = n1 + (0 if symmetric else n2)
    return SimpleNamespace(kernel=unpermute(Kd), groups=groups_out), {"schedule": "activations", "gradient_passes": passes, "activation_bytes": int(cap_bytes),
                 "row_block": min(R, n1), "memory_budget": budget, "full_jacobian_bytes": full_bytes,
                 "engine": jf1.engine}


def _computes(rank: int, s: int, k: int, world: int) -> str | None:
    """Symmetric distributed kernel: which of its rows ``rank`` multiplies by chunk ``k`` of shard ``s``.

    ``"all"``, ``"odd"`` (only its rows in odd-numbered chunks of its own shard) or None. Each unordered
    pair of shards is done once, the diagonal block by its owner (not here): by ``rank`` when
    ``0 < (s − rank) mod W < W/2``; at ``W/2`` exactly (even ``W``) the pair is split: the lower rank takes
    the even chunks of the higher rank's shard (all its own rows), the higher rank its own odd chunks'
    rows times every chunk of the lower rank's shard.
    """
    if rank == s:
        return None
    dd = (s - rank) % world
    if 2 * dd < world:
        return "all"
    if 2 * dd == world:
        if rank < s:
            return "all" if k % 2 == 0 else None
        return "odd"
    return None


def _exact_distributed(jf1, jf2, b1, b2, symmetric, acc, budget, o1, o2, d: _Dist, work_for):
    """Exact kernel over ``d.world`` ranks; every rank returns the whole kernel.

    Each rank computes and keeps the Jacobians of its shard of ``inputs1`` (``_shards``). Symmetric: rank
    ``r`` computes its diagonal block and the blocks ``(r, s)`` with ``0 < (s − r) mod W < W/2`` (at
    ``W/2`` exactly: every other chunk of ``s``), from chunks of shard ``s`` broadcast by rank ``s`` out of
    its stored rows: every block once, balanced, each gradient computed once. Cross kernel: rank ``s``
    computes its shard of ``inputs2`` chunk by chunk and broadcasts it; every rank multiplies it by its
    stored rows. Finally the float64 kernels are summed over the ranks (all-reduce).
    """
    W, r = d.world, d.rank
    sh1 = _shards(b1, W)
    sh2 = sh1 if symmetric else _shards(b2, W)
    itemsize = torch.finfo(jf1.dtype).bits // 8
    per_ex1 = o1 * jf1.p * itemsize
    chunk = jf1.chunk_size
    m = max(len(s) for s in sh1)

    def need_bytes(c):  # stored shard + a received chunk + the work of a computed chunk
        return m * per_ex1 + c * o2 * jf1.p * itemsize + work_for(c)

    while chunk > 1 and need_bytes(chunk) > budget:
        chunk //= 2
    if need_bytes(chunk) > budget:
        raise NTKError(
            f"distributed exact kernel does not fit: each of the {W} ranks keeps the Jacobians of its "
            f"{m} examples ({_fmt_bytes(m * per_ex1)}, o × p × {itemsize} B each, p = {jf1.p:,}) and needs "
            f"{_fmt_bytes(need_bytes(chunk))} in all > budget {_fmt_bytes(budget)}. Use more ranks, a larger "
            "max_memory, fewer parameters or mode='sketch'.")
    jf1.chunk_size = jf2.chunk_size = chunk
    dev1 = b1["input_ids"].device
    passes = 0
    mine = sh1[r]
    R = {g: torch.empty((len(mine), o1, jf1.group_sizes[g]), dtype=jf1.dtype, device=jf1.device)
         for g in jf1.groups}
    for pos, J in jf1.blocks(b1, mine.to(dev1), "inputs1"):
        passes += len(pos)
        for g in J:
            R[g][pos.to(jf1.device)] = J[g]
    if symmetric:
        acc.add(R, R, mine, mine, mirror=False)

    def share(rank, s, k):
        return _computes(rank, s, k, W) if symmetric else "all"

    odd = torch.cat([torch.arange(a, min(a + chunk, len(mine)))
                     for a in range(chunk, len(mine), 2 * chunk)] or [torch.zeros(0, dtype=torch.long)])
    R_odd = None  # own rows in odd-numbered chunks (for a pair split at W/2), made when first needed
    jB = jf1 if symmetric else jf2
    oB = o1 if symmetric else o2
    for s in range(W):
        if symmetric:
            chunks = [(sh1[s][a:a + chunk], None) for a in range(0, len(sh1[s]), chunk)]
        else:
            chunks = [(sh2[s][pos], pos) for pos in jf2.plan(b2, sh2[s])]
        for k, (rows, pos) in enumerate(chunks):
            if not any(share(q, s, k) for q in range(W)):
                continue
            if r == s:
                if symmetric:
                    a = k * chunk
                    JB = {g: R[g][a:a + len(rows)] for g in jf1.groups}
                else:
                    JB = jf2.chunk(b2, rows.to(b2["input_ids"].device), "inputs2")
                    passes += len(rows)
                flat = _pack(JB, jB.groups)
            else:
                flat = torch.empty((len(rows), oB * jB.p), dtype=jB.dtype, device=d.device)
            flat = d.broadcast(flat, s)
            how = share(r, s, k)
            if how is not None:
                JB = _unpack(flat.to(jf1.device), jB.groups, jB.group_sizes, oB)
                if how == "all":
                    acc.add(R, JB, mine, rows, mirror=symmetric)
                elif len(odd):
                    if R_odd is None:
                        R_odd = {g: R[g][odd.to(jf1.device)] for g in jf1.groups}
                    acc.add(R_odd, JB, mine[odd], rows, mirror=True)
            del flat
    del R, R_odd
    d.all_reduce_(acc.kernel)
    for g in acc.groups:
        d.all_reduce_(acc.groups[g])
    n_all = b1["input_ids"].shape[0] + (0 if symmetric else b2["input_ids"].shape[0])
    return acc, {"gradient_passes": passes, "row_block": m, "memory_budget": budget, "world_size": W,
                 "rank": r, "full_jacobian_bytes": n_all * per_ex1, "engine": jf1.engine}


# --- sketch -------------------------------------------------------------------------------------------------------


def _block_seed(seed: int, sel: ParamSelection, block: int) -> int:
    key = f"{seed}|{sel.name}|{sel.group}|{sel.dim}|{sel.ranges}|{block}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


class Projector:
    """Seeded blockwise random projection ``R^p -> R^k``: ``φ = g S / √k``, ``S`` never materialised.

    ``S`` is the row-wise concatenation over selections of blocks of ``block_rows`` rows, each drawn from a
    generator seeded by ``(seed, selection, block index)``: independent of the examples, the chunking
    and the task, so one seed gives the same ``S`` for every task on the same device type (CPU and CUDA
    generators differ). Entries are ±1 (Rademacher) or N(0, 1) (Gaussian), so ``E[S Sᵀ] = k·I``.
    """

    def __init__(self, sels: list[ParamSelection], k: int, seed: int = 0, projection: str = "rademacher",
                 block_rows: int | None = None):
        if projection not in PROJECTIONS:
            raise NTKError(f"unknown projection {projection!r}; valid: {', '.join(PROJECTIONS)}")
        if k < 1:
            raise NTKError(f"sketch dimension k must be >= 1, got {k}")
        self.sels, self.k, self.seed, self.projection = sels, int(k), int(seed), projection
        self.block_rows = int(block_rows or max(1, (1 << 25) // self.k))  # 128 MB fp32 blocks

    def _block(self, sel, b, rows, dtype, device):
        g = torch.Generator(device=device)
        g.manual_seed(_block_seed(self.seed, sel, b))
        if self.projection == "gaussian":
            return torch.randn((rows, self.k), generator=g, dtype=dtype, device=device)
        # Rademacher from random bits: 32 signs per random integer (32× fewer generator draws)
        words = (self.k + 31) // 32
        bits = torch.empty((rows, words), dtype=torch.int64, device=device).random_(0, 1 << 32, generator=g)
        shifts = torch.arange(32, device=device, dtype=torch.int64)
        signs = ((bits[:, :, None] >> shifts) & 1).reshape(rows, words * 32)[:, : self.k]
        return signs.to(dtype).mul_(2).sub_(1)

    def project(self, jac: dict[str, torch.Tensor], per_group: bool = False):
        """Project a Jacobian chunk (group -> ``(b, o, p_g)``, selections concatenated in order) to
        ``(b, o, k)``; with ``per_group`` also return group -> ``(b, o, k)`` (they sum to the total)."""
        total, groups = None, {}
        offsets: dict[str, int] = {}
        for sel in self.sels:
            J = jac[sel.group]
            b, o, _ = J.shape
            off = offsets.get(sel.group, 0)
            offsets[sel.group] = off + sel.numel
            Jm = J.reshape(b * o, -1)
            out = torch.zeros((b * o, self.k), dtype=J.dtype, device=J.device)
            for blk, r in enumerate(range(0, sel.numel, self.block_rows)):
                rows = min(self.block_rows, sel.numel - r)
                S = self._block(sel, blk, rows, J.dtype, J.device)
                out.addmm_(Jm[:, off + r: off + r + rows], S)
            out = out.reshape(b, o, self.k) / math.sqrt(self.k)
            total = out if total is None else total + out
            if per_group:
                groups[sel.group] = groups[sel.group] + out if sel.group in groups else out
        return total, groups


# --- features -----------------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Per-example Jacobian features ``φ(x_i) ∈ R^{o × d}`` with ``<φ(x), φ(x')> ≈ K(x, x')``.

    Attributes:
        features: ``(n, o, d)`` tensor on the CPU: the Jacobian itself (exact, ``d = p``, float64 copy of
            the model dtype) or its sketch (``d = k``).
        groups: group -> ``(n, o, k)`` sketched group features (sketch with ``per_group``), or group ->
            ``slice`` of the columns of ``features`` (exact).
        mode, output, params, p, group_sizes, sketch_dim, seed, projection: how they were made.
    """

    features: torch.Tensor
    groups: dict
    mode: str
    output: str
    params: str
    p: int
    group_sizes: dict
    sketch_dim: int | None = None
    seed: int | None = None
    projection: str | None = None

    def group(self, g: str) -> torch.Tensor:
        v = self.groups[g]
        return self.features[..., v] if isinstance(v, slice) else v

    def kernel(self, other: "Features | None" = None, kind: str = "full") -> torch.Tensor:
        """float64 kernel ``<φ_i, φ'_j>`` in the layout of ``kind``."""
        B = self.features if other is None else other.features
        return _gram_tile(self.features, B, kind)


def jacobian_features(model: nn.Module, inputs, params="qkv", output: str = "logits", mode: str = "exact",
                      sketch_dim: int = 8192, seed: int = 0, projection: str = "rademacher",
                      per_group: bool = False, chunk_size: int | None = None, feature_dtype=None,
                      block_rows: int | None = None, project_batch: int | None = None, *,
                      distributed: bool | None = None, process_group=None) -> Features:
    """Per-example Jacobian features of ``model`` at its current parameters.

    Args:
        model: a :class:`~taskvec.modeling.TaskModel` (or any module mapping ``input_ids, attention_mask``
            to logits ``(B, C)``).
        inputs: tokenised batch dict (or list of dicts): ``input_ids (n, L)``, ``attention_mask (n, L)``,
            optional ``token_type_ids``, ``labels (n,)``.
        params: parameter selection (see :func:`select_params`); default ``"qkv"``.
        output: ``"logits"`` | ``"margin"`` | ``"loss"``.
        mode: ``"exact"`` -> ``(n, o, p)`` Jacobian rows (memory ``n·o·p·8`` bytes!); ``"sketch"`` ->
            ``(n, o, k)`` with ``k = sketch_dim``.
        seed, projection, block_rows: the sketch (same values => same ``S`` across calls and tasks).
        per_group: sketch only: also keep group -> ``(n, o, k)`` features.
        feature_dtype: dtype of stored features (default float64 for exact, float32 for sketch).
        project_batch: sketch only: examples whose Jacobians are gathered before one projection pass
            (each pass regenerates ``S``: larger is faster, costs ``project_batch·o·p`` floats of memory).
        distributed: shard the examples over the ranks of ``torch.distributed`` (default ``None``: when it
            is initialised with more than one rank; ``False``: never) and all-gather the features, so that
            every rank returns all ``n`` rows. Every rank must pass the same inputs and model.
        process_group: the group to shard over (default: the default group).

    Returns:
        :class:`Features` on the CPU.
    """
    if mode not in ("exact", "sketch"):
        raise NTKError(f"jacobian_features mode must be 'exact' or 'sketch', got {mode!r}")
    sels = select_params(model, params)
    dev = _model_device(model)
    batch = as_batch(inputs, dev)
    jf = _Jacobian(model, sels, output, chunk_size or _default_chunk(dev))
    n = batch["input_ids"].shape[0]
    d = _dist_context(distributed, process_group, dev)
    shards = _shards(batch, d.world) if d is not None else None
    rows = shards[d.rank] if d is not None else torch.arange(n)  # examples this rank computes
    m = len(rows)
    rows_dev = rows.to(dev)
    with tf32_disabled(), _eval_mode(model), torch.no_grad():
        o = jf.num_outputs(batch)
        if mode == "exact":
            fdt = feature_dtype or torch.float64
            F = torch.empty((m, o, jf.p), dtype=fdt)
            for pos, J in jf.blocks(batch, rows_dev, "inputs"):
                F[pos] = torch.cat([J[g] for g in jf.groups], -1).to("cpu", fdt)
            if d is not None:
                F = d.gather_rows(F, shards, n)
            slices, a = {}, 0
            for g in jf.groups:
                slices[g] = slice(a, a + jf.group_sizes[g])
                a += jf.group_sizes[g]
            return Features(F, slices, mode, output, _params_label(params), jf.p, dict(jf.group_sizes))
        proj = Projector(sels, sketch_dim, seed, projection, block_rows)
        fdt = feature_dtype or torch.float32
        F = torch.empty((m, o, proj.k), dtype=fdt)
        G = {g: torch.empty((m, o, proj.k), dtype=fdt) for g in jf.groups} if per_group else {}
        # project in batches of `project_batch` examples: each pass regenerates S (p·k random numbers)
        pb = max(project_batch or jf.chunk_size, jf.chunk_size)
        buf: list = []

        def flush():
            if not buf:
                return
            pos = torch.cat([b[0] for b in buf])
            J = {g: torch.cat([b[1][g] for b in buf]) for g in jf.groups}
            buf.clear()
            tot, grp = proj.project(J, per_group)
            F[pos] = tot.to("cpu", fdt)
            for g, v in grp.items():
                G[g][pos] = v.to("cpu", fdt)

        count = 0
        for pos, J in jf.blocks(batch, rows_dev, "inputs"):
            buf.append((pos, J))
            count += len(pos)
            if count >= pb:
                flush()
                count = 0
        flush()
        if d is not None:
            F = d.gather_rows(F, shards, n)
            G = {g: d.gather_rows(v, shards, n) for g, v in G.items()}
        return Features(F, G, mode, output, _params_label(params), jf.p, dict(jf.group_sizes), proj.k, seed,
                        projection)


def _params_label(params) -> str:
    return params if isinstance(params, str) else "custom"


def _default_chunk(device) -> int:
    # H100, MiniLM L=128 (vmap engine): per-example gradients of 2,000 examples take 0.85 s at 64, 0.52 s at
    # 256. CPU (2 shared cores), 64 examples: batched engine at chunk 16 6.2 s, 32 5.8 s, 64 5.9 s; vmap at 32 7.5 s
    return 256 if torch.device(device).type == "cuda" else 32


# --- reference (NTK-vector products) -------------------------------------------------------------------------


def model_outputs(model: nn.Module, inputs, output: str = "logits") -> torch.Tensor:
    """``(B, o)`` outputs through the model's ordinary forward (2-D padding mask)."""
    b = as_batch(inputs, _model_device(model))
    logits = _Wrapped(model)(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
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
    from .linearize import jvp_batch

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
    with _eval_mode(model), torch.enable_grad():
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


# --- public entry point ------------------------------------------------------------------------------------------


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
        mode: ``"exact"`` | ``"sketch"`` | ``"reference"`` (see module docstring).
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
        schedule: how exact mode stores its work (single process): ``"activations"`` keeps each selected
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
    if schedule not in ("auto", "activations", "jacobian"):
        raise NTKError(f"unknown schedule {schedule!r}; valid: auto, activations, jacobian")
    if mode not in MODES:
        raise NTKError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if kernel not in KERNELS:
        raise NTKError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if output not in OUTPUTS:
        raise NTKError(f"unknown output {output!r}; valid: {', '.join(OUTPUTS)}")
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
    with tf32_disabled(), _eval_mode(model, model2), torch.no_grad():
        o1, o2 = jf1.num_outputs(b1), jf2.num_outputs(b2)
        if kernel != "full" and o1 != o2:
            raise NTKError(f"kernel={kernel!r} needs the same number of outputs on both sides (got {o1} and "
                           f"{o2}: tasks with different label sets); use kernel='full' or output='margin'/'loss'")
        need = math.prod(_kernel_shape(kernel, n1, n2, o1, o2)) * 8 * (1 + (len(jf1.groups) if groups else 0))
        cpu_budget = default_memory_budget("cpu") / 0.4 * 0.8
        if need > cpu_budget:
            raise NTKError(f"the kernel{' and its group kernels' if groups else ''} need {_fmt_bytes(need)} of "
                           f"host memory (available ~{_fmt_bytes(cpu_budget)}); use groups=False, "
                           "kernel='trace', fewer examples, or mode='sketch' and work with the features")
        if mode == "reference":
            K, G = _reference(model, model2, sels1, b1, b2, kernel, groups, output, o1, o2)
        elif mode == "exact":
            budget = parse_bytes(max_memory) if max_memory is not None else default_memory_budget(dev)
            acc, info = _exact(jf1, jf2, b1, b2, symmetric, kernel, groups, budget, o1, o2, dist=d,
                               schedule=schedule)
            K, G = acc.kernel, acc.groups
        else:
            proj = Projector(sels1, sketch_dim, seed, projection, block_rows)

            def feats(jf, b, name):
                n = b["input_ids"].shape[0]
                shards = _shards(b, d.world) if d is not None else None
                rows = (shards[d.rank] if d is not None else torch.arange(n)).to(b["input_ids"].device)
                F = torch.empty((len(rows), o1 if jf is jf1 else o2, proj.k), dtype=torch.float64,
                                device=jf.device)
                Gs = {g: torch.empty_like(F) for g in jf.groups} if groups else {}
                for pos, J in jf.blocks(b, rows, name):
                    tot, grp = proj.project(J, groups)
                    F[pos.to(F.device)] = tot.double()
                    for g, v in grp.items():
                        Gs[g][pos.to(F.device)] = v.double()
                if d is not None:
                    F = d.gather_rows(F, shards, n)
                    Gs = {g: d.gather_rows(v, shards, n) for g, v in Gs.items()}
                return F, Gs

            F1, G1 = feats(jf1, b1, "inputs1")
            F2, G2 = (F1, G1) if symmetric else feats(jf2, b2, "inputs2")
            K = _gram_tile(F1, F2, kernel).cpu()
            G = {g: _gram_tile(G1[g], G2[g], kernel).cpu() for g in G1}
            info = {"features_bytes": F1.numel() * 8 * (1 + len(G1)), "engine": jf1.engine}
            if d is not None:
                info.update({"world_size": d.world, "rank": d.rank})
    if symmetric:
        M = kernel_matrix(K, kernel)
        info["asymmetry"] = float((M - M.T).abs().max() / M.abs().max().clamp_min(1e-300))
    return NTKResult(K, G, kernel, output, mode, _params_label(params), n1, n2, o1, o2, jf1.p,
                     dict(jf1.group_sizes), symmetric, sketch_dim if mode == "sketch" else None,
                     seed if mode == "sketch" else None, projection if mode == "sketch" else None,
                     time.perf_counter() - t0, info)


# --- run directories (CLI: taskvec ntk RUN/) ---------------------------------------------------------------------


def base_task_model(run_dir, task: str, device=None) -> nn.Module:
    """θ0 for one task of a fine-tuning run: the run's *base* backbone with that task's saved head."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from .finetune import load_run
    from .modeling import HeadSpec, TaskModel, load_backbone, make_head

    meta = load_run(run_dir)
    d = Path(run_dir) / "finetune" / task
    spec = HeadSpec(**json.loads((d / "head.json").read_text()))
    bb = load_backbone(meta["base_model"])
    head = make_head(spec, bb)
    head.load_state_dict(load_file(str(d / "head.safetensors")), strict=False)
    m = TaskModel(bb, head.to(_model_dtype(bb)), spec).eval()
    return m.to(device) if device is not None else m


def _init_torchrun(device):
    """Under torchrun (``WORLD_SIZE`` > 1) without a process group yet: start one (NCCL on
    ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` is not the CPU, else gloo).

    Returns ``(started, rank, device)``; ``device`` defaults to CUDA when available (``cuda:LOCAL_RANK``
    under torchrun), else the CPU.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if world > 1 and want_cuda and (device is None or torch.device(device).index is None):
        device = torch.device("cuda", local)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return started, rank, device


def run_ntk(run_dir, out=None, n: int = 512, params="qkv", mode: str = "exact", output: str = "logits",
            kernel: str = "full", cross: bool = True, sketch_dim: int = 8192, seed: int = 0, device=None,
            num_boot: int = 100, max_length: int = 128, plots: bool = True) -> dict:
    """Kernels and spectra for every task of a fine-tuning run (``taskvec ntk RUN/``).

    For each task: ``n`` training examples (seeded subsample of the saved split), θ0 = base backbone + the
    task's head, the eNTK (``kernel``, with per-group kernels) saved as ``OUT/<task>.safetensors`` (+ meta
    JSON) and its :class:`~taskvec.spectrum.SpectrumReport` as ``OUT/<task>.spectrum.json``; with ``cross``
    the trace cross-task kernels ``OUT/cross/<a>__<b>.safetensors`` (tasks with different label counts:
    full kernel). ``out`` defaults to ``RUN/ntk``. Plots (``spectrum.png``, ``group_traces.png``,
    ``effective_ranks.png``) are drawn from the saved JSON. Returns ``{task: spectrum summary dict}``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the kernels are computed by all ranks together (NCCL with
    ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU; see :func:`empirical_ntk`) and only
    rank 0 writes files.
    """
    import json
    from pathlib import Path

    from .finetune import load_run
    from .io import write_json
    from .modeling import load_tokenizer
    from .spectrum import spectrum_report
    from .tasks import Batches, Splits, load_saved_task

    started, rank, device = _init_torchrun(device)
    try:
        run_dir = Path(run_dir)
        meta = load_run(run_dir)
        out = Path(out) if out is not None else run_dir / "ntk"
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        tok = load_tokenizer(meta["base_model"])
        models, inputs, summary = {}, {}, {}
        for name in meta["tasks"]:
            d = run_dir / "finetune" / name
            if not (d / "head.json").exists():
                raise NTKError(f"task {name!r} of {run_dir} has no saved head ({d}); fine-tune it first")
            task = load_saved_task(d / "task.json")
            split = Splits.from_json(json.loads((d / "split.json").read_text()))
            g = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(split.train), generator=g)[:n].sort().values.tolist()
            idx = [split.train[i] for i in pick]
            batch = as_batch(list(Batches(tok, task, idx, batch_size=64, max_length=max_length)))
            model = base_task_model(run_dir, name, device)
            res = empirical_ntk(model, batch, params=params, output=output, mode=mode, kernel=kernel,
                                sketch_dim=sketch_dim, seed=seed)
            rep = spectrum_report(res, labels=batch["labels"].numpy(), num_boot=num_boot, seed=seed)
            rep.meta.update({"task": name, "examples": idx, "base_model": meta["base_model"]})
            if rank == 0:  # under torchrun every rank holds the same kernel; one writes it
                res.save(out / f"{name}.safetensors")
                write_json(out / f"{name}.spectrum.json", rep.to_json())
            summary[name] = {"alpha": rep.uncentered.decay.alpha if rep.uncentered.decay else None,
                             "participation_ratio": rep.uncentered.ranks.participation_ratio,
                             "alignment": rep.alignment, "kernel_ridge_cv_accuracy":
                                 (rep.kernel_ridge or {}).get("cv_accuracy"), "seconds": res.seconds}
            models[name], inputs[name] = model, batch
        if cross and len(models) > 1:
            if rank == 0:
                (out / "cross").mkdir(exist_ok=True)
            names = list(models)
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    o_a, o_b = models[a].spec.num_labels, models[b].spec.num_labels
                    kind = "trace" if (o_a == o_b or output != "logits") else "full"
                    r = empirical_ntk(models[a], inputs[a], inputs[b], model2=models[b], params=params,
                                      output=output, mode=mode, kernel=kind, groups=False,
                                      sketch_dim=sketch_dim, seed=seed)
                    if rank == 0:
                        r.save(out / "cross" / f"{a}__{b}.safetensors")
        if rank != 0:
            return summary
        write_json(out / "summary.json", summary)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if plots:
        from .ntk_plots import plot_run

        plot_run(out)
    return summary
