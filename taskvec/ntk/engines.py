"""Per-example gradient engines: the Jacobian rows ``J(x_i) = ∂f(x_i; θ0)/∂θ_sel ∈ R^{o × p}``, chunk by chunk.

Each engine is one function with one signature (as in neural-tangents' ``empirical.py``, one function per
implementation)::

    engine(jf: _Jacobian, sub: dict, check: bool) -> {param name: (b, o, *param shape)} | None

``sub`` is a chunk of ``b`` examples (common padding trimmed, ``sub["mask4d"]`` the additive 4-D mask);
``None`` means the engine does not apply to this model and selection (the caller falls back to
:data:`Engine.VMAP`, which always applies). :class:`Engine` documents the choice; :class:`_Jacobian`
holds one model's state (wrapped model, selection, groups) and turns an engine's per-parameter gradients
into per-group rows ``(b, o, p_g)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum

import torch
from torch import nn

from ..modelfn import NTKError, _model_device, _model_dtype, _slice, additive_mask, reduce_outputs, wrap_model
from ..scopes import ParamSelection
from .selection import _group_order, _take


class Engine(str, Enum):
    """How the per-example Jacobian rows are computed (``_Jacobian(engine=...)``). Both give the same rows
    (tested to 1e-12 in float64); they differ in what they apply to, in time and in memory.

    ``AUTO`` (``"auto"``)
        ``BATCHED`` when it applies (checked once, on the first chunk), else ``VMAP``.
    ``BATCHED`` (``"batched"``)
        every selected tensor must be the weight or bias of a linear layer (``nn.Linear``, GPT-2
        ``Conv1D``, peft LoRA factors) used by no other module. One ordinary batched forward and, per
        output, one backward to the *outputs* of those layers (no weight gradients), then per-example weight
        gradients ``Σ_t g_{i,t} a_{i,t}ᵀ`` from each layer's saved inputs ``a`` and output gradients ``g``
        (a batched matmul). Examples are independent in eval mode, so row ``i`` is exactly example ``i``'s
        gradient. Fastest (the model's own batched kernels, ``o`` backward passes per chunk), and the only
        engine whose intermediate state (layer inputs and output gradients, per token ``d_in + o·d_out``
        numbers) can be kept instead of the rows: the ``"activations"`` schedule. Checked once per
        :class:`_Jacobian`, on the first chunk: the per-example gradients must sum to autograd's batch
        gradient (a layer used in some other way, e.g. its weight read functionally, fails the check and
        switches to ``VMAP``, with ``fallback_reason`` saying why).
    ``VMAP`` (``"vmap"``)
        ``vmap(jacrev(functional_call))`` of the single-example function: any selection (embeddings,
        layer norms, tied weights), ``o`` vectorised backward passes per chunk, memory ``b·o·p`` for the
        chunk's rows plus ``vmap``'s per-example intermediates. Passes a ready additive 4-D mask so that
        transformers' data-dependent mask helpers stay out of ``vmap``.
    """

    AUTO = "auto"
    BATCHED = "batched"
    VMAP = "vmap"


def _default_chunk(device) -> int:
    # H100, MiniLM L=128 (vmap engine): per-example gradients of 2,000 examples take 0.85 s at 64, 0.52 s at
    # 256. CPU (2 shared cores), 64 examples: batched engine at chunk 16 6.2 s, 32 5.8 s, 64 5.9 s; vmap at 32 7.5 s
    return 256 if torch.device(device).type == "cuda" else 32


def _check_finite(J: torch.Tensor, examples: torch.Tensor, name: str, group: str) -> None:
    """Raise naming the first example (index into ``name``) whose Jacobian rows ``J (b, o, p_g)`` are not finite."""
    bad = ~torch.isfinite(J).reshape(J.shape[0], -1).all(1)
    if bool(bad.any()):
        i = int(examples[int(bad.nonzero()[0])])
        raise NTKError(f"non-finite gradient for example {i} of {name} (parameter group {group}); "
                       "check that example's tokens/labels and the model's dtype")


# --- linear layers (the batched engine) ----------------------------------------------------------------------


def _linear_kind(module: nn.Module) -> str | None:
    """``"linear"`` (``y = x Wᵀ + b``, W ``(out, in)``), ``"conv1d"`` (transformers' GPT-2 ``Conv1D``:
    ``y = x W + b``, W ``(in, out)``) or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.ndim == 2:
        return "conv1d"
    return None


def _linear_layers(model: nn.Module, names: list[str]):
    """param name -> (module name, module, "weight"|"bias", kind) for every selected tensor, or None."""
    modules = dict(model.named_modules())
    counts: dict[int, int] = {}
    for _, prm in model.named_parameters(remove_duplicate=False):
        counts[id(prm)] = counts.get(id(prm), 0) + 1
    uses: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        uses[id(mod)] = uses.get(id(mod), 0) + 1
    out = {}
    for n in names:
        mname, _, attr = n.rpartition(".")
        mod = modules.get(mname)
        kind = _linear_kind(mod) if mod is not None else None
        if kind is None or attr not in ("weight", "bias") or getattr(mod, attr) is None:
            return None
        if counts.get(id(getattr(mod, attr)), 0) != 1 or uses.get(id(mod), 0) != 1:
            return None  # tied or shared: other uses would be missed
        out[n] = (mname, mod, attr, kind)
    return out


def _record_layers(jf: _Jacobian, sub) -> tuple[torch.Tensor, dict, bool]:
    """One batched forward with hooks on the selected layers: ``(f (b, o), {module: [(input, output)] per
    call}, ok)``; ``ok`` is False when a layer was called on something other than the batch."""
    b = sub["input_ids"].shape[0]
    mods = {mname: mod for mname, mod, _, _ in jf._layers.values()}
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

    handles = [mod.register_forward_hook(hook_for(m)) for m, mod in mods.items()]
    try:
        with torch.enable_grad():
            logits = jf.wrapped(sub["input_ids"], sub["attention_mask"], sub.get("token_type_ids"), sub["mask4d"])
            f = reduce_outputs(logits, sub.get("labels"), jf.output)  # (b, o)
    finally:
        for h in handles:
            h.remove()
    return f, seen, ok[0]


def _check_capture(jf: _Jacobian, cap: dict, batch_grad: dict, named: dict) -> bool:
    """Do the per-example gradients of output 0 sum to autograd's batch gradient? (sets ``fallback_reason``)"""
    tol = 1e-9 if jf.dtype == torch.float64 else 1e-3
    for n in jf.names:
        ref = batch_grad[n]
        ref = torch.zeros_like(named[n]) if ref is None else ref
        got = form_param(jf, cap, n, outputs=[0])[:, 0].sum(0)
        if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(ref).all())):
            continue  # a non-finite gradient is the data's fault: reported with its example later
        err = float((got - ref).norm()) / max(float(ref.norm()), 1e-30)
        if not err <= tol:
            jf.fallback_reason = (f"per-example gradients of {n} do not sum to the batch gradient "
                                  f"(relative difference {err:.1e})")
            return False
    return True


def capture(jf: _Jacobian, sub, check: bool) -> dict | None:
    """One batched forward and one backward per output to the selected layers' outputs (no weight
    gradients): ``{"b", "o", "x": {module: [input (b, ..., d_in)] per call}, "g": [{(module, call): output
    gradient (b, ..., d_out)} per output]}``; ``check`` also verifies that the per-example gradients of
    output 0 sum to autograd's batch gradient. None when the layers are not used as plain per-example
    linear maps (see :class:`Engine`)."""
    named = dict(jf.model.named_parameters())
    ps = [named[n] for n in jf.names]
    req = [p.requires_grad for p in ps]
    try:
        for p in ps:
            p.requires_grad_(True)
        f, seen, ok = _record_layers(jf, sub)
        if not ok or any(not v for v in seen.values()):
            return None
        keys = [(m, k) for m in seen for k in range(len(seen[m]))]
        outs = [seen[m][k][1] for m, k in keys]
        o = f.shape[1]
        cap = {"b": sub["input_ids"].shape[0], "o": o, "x": {m: [x for x, _ in v] for m, v in seen.items()},
               "shape": {m: [y.shape[-1] for _, y in v] for m, v in seen.items()}, "g": []}
        batch_grad = None
        for a in range(o):
            wrt = outs + (ps if check and a == 0 else [])
            with torch.enable_grad():
                fa = f[:, a].sum()
            gs = torch.autograd.grad(fa, wrt, retain_graph=a < o - 1, allow_unused=True)
            if check and a == 0:
                batch_grad = dict(zip(jf.names, gs[len(outs):]))
            cap["g"].append(dict(zip(keys, gs[: len(outs)])))
        seen.clear()  # the layer outputs (and with them the graph) are no longer needed
        del outs, f
        if check and not _check_capture(jf, cap, batch_grad, named):
            return None
        return cap
    finally:
        for p, r in zip(ps, req):
            p.requires_grad_(r)


def form_param(jf: _Jacobian, cap: dict, n: str, outputs=None) -> torch.Tensor:
    """Per-example gradients ``(b, o, *shape)`` of parameter ``n`` from a capture: ``Σ_t g_{i,t} x_{i,t}ᵀ``
    (a batched matmul per layer call) for weights, ``Σ_t g_{i,t}`` for biases."""
    mname, mod, attr, kind = jf._layers[n]
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
            tot = torch.zeros((b,) + tuple(mod.get_parameter(attr).shape), dtype=jf.dtype, device=jf.device)
        per.append(tot)
    return torch.stack(per, 1)


# --- the engines: one signature --------------------------------------------------------------------------------


def batched_jacobian(jf: _Jacobian, sub: dict, check: bool) -> dict[str, torch.Tensor] | None:
    """:data:`Engine.BATCHED`: param name -> ``(b, o, *shape)`` from one batched forward + one backward per
    output; None when the layers are not used as plain per-example linear maps."""
    cap = capture(jf, sub, check)
    return None if cap is None else {n: form_param(jf, cap, n) for n in jf.names}


def vmap_jacobian(jf: _Jacobian, sub: dict, check: bool = False) -> dict[str, torch.Tensor]:
    """:data:`Engine.VMAP`: param name -> ``(b, o, *shape)`` by ``vmap(jacrev)`` (any selection; ``check``
    is unused: nothing to verify)."""
    def single(params, ex):
        ids = ex["input_ids"][None]
        m2 = ex["attention_mask"][None]
        tt = ex["token_type_ids"][None] if "token_type_ids" in ex else None
        logits = torch.func.functional_call(jf.wrapped, params, (ids, m2, tt, ex["mask4d"][None]))
        y = ex["labels"][None] if "labels" in ex else None
        return reduce_outputs(logits, y, jf.output)[0]

    jac = torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(jf.params, sub)
    return {n: jac["m." + n] for n in jf.names}


ENGINES: dict[Engine, Callable[[_Jacobian, dict, bool], dict[str, torch.Tensor] | None]] = {
    Engine.BATCHED: batched_jacobian,
    Engine.VMAP: vmap_jacobian,
}


# --- one model's Jacobian rows -----------------------------------------------------------------------------------


class _Jacobian:
    """Per-example Jacobians of one model's outputs with respect to a selection, chunk by chunk.

    ``engine``: ``"auto"`` | ``"batched"`` | ``"vmap"`` (see :class:`Engine`); ``self.engine`` is the one in
    use (``"batched"`` or ``"vmap"``; ``"batched"`` may switch to ``"vmap"`` at the first chunk, with
    ``self.fallback_reason``).
    """

    def __init__(self, model: nn.Module, sels: list[ParamSelection], output: str, chunk_size: int,
                 engine: str = "auto"):
        self.model, self.sels, self.output = model, sels, output
        self.wrapped = wrap_model(model)
        self.names = list(dict.fromkeys(s.name for s in sels))
        named = dict(model.named_parameters())
        self.params = {"m." + n: named[n].detach() for n in self.names}
        self.dtype, self.device = _model_dtype(model), _model_device(model)
        self.groups = _group_order(sels)
        self.group_sizes = {g: sum(s.numel for s in sels if s.group == g) for g in self.groups}
        self.p = sum(self.group_sizes.values())
        self.chunk_size = max(1, int(chunk_size))
        self.check_finite = True  # every chunk's Jacobian checked (a caller that checks its own result may skip it)
        try:
            want = Engine(engine)
        except ValueError:
            raise NTKError(f"unknown engine {engine!r}; valid: {', '.join(e.value for e in Engine)}") from None
        self._layers = _linear_layers(model, self.names) if want != Engine.VMAP else None
        if want == Engine.BATCHED and self._layers is None:
            raise NTKError("engine='batched' needs every selected tensor to be a weight/bias of a linear layer")
        self.engine = (Engine.BATCHED if self._layers is not None else Engine.VMAP).value
        self._checked = False
        self.fallback_reason: str | None = None

    def num_outputs(self, batch: dict) -> int:
        with torch.no_grad():
            sub = _slice(batch, slice(0, 1))
            logits = self.wrapped(sub["input_ids"], sub["attention_mask"], sub.get("token_type_ids"))
            return int(reduce_outputs(logits, sub.get("labels"), self.output).shape[-1])

    def _sub(self, batch: dict, idx: torch.Tensor) -> dict:
        sub = _slice(batch, idx)
        sub["mask4d"] = additive_mask(sub["attention_mask"], self.wrapped.decoder, self.dtype)
        return sub

    def _fall_back(self) -> None:
        self.engine = Engine.VMAP.value
        self.fallback_reason = self.fallback_reason or "a selected layer is not applied per example"

    def form_group(self, cap: dict, g: str) -> torch.Tensor:
        """Jacobian rows ``(b, o, p_g)`` of parameter group ``g`` from a capture (see :func:`capture`)."""
        parts = [_take(s, form_param(self, cap, s.name), 2) for s in self.sels if s.group == g]
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
        """:func:`capture` of the examples ``idx`` (common padding trimmed); None, and the engine switched to
        ``"vmap"``, when the batched engine does not apply."""
        if self.engine != Engine.BATCHED:
            return None
        cap = capture(self, self._sub(batch, idx), check=not self._checked)
        self._checked = True
        if cap is None:
            self._fall_back()
        return cap

    def chunk(self, batch: dict, idx: torch.Tensor, offset_name: str = "inputs") -> dict[str, torch.Tensor]:
        """Jacobians of the examples ``idx`` (after trimming common padding): group -> ``(b, o, p_g)``."""
        sub = self._sub(batch, idx)
        jac = None
        if self.engine == Engine.BATCHED:
            jac = ENGINES[Engine.BATCHED](self, sub, not self._checked)
            if jac is None:
                self._fall_back()
            self._checked = True
        if jac is None:
            jac = ENGINES[Engine.VMAP](self, sub, False)
        out: dict[str, list] = {g: [] for g in self.groups}
        for s in self.sels:
            out[s.group].append(_take(s, jac[s.name], 2))
        del jac
        res = {g: (torch.cat(v, -1) if len(v) > 1 else v[0]).contiguous() for g, v in out.items()}
        if self.check_finite:
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
