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
    per-example Jacobians from ``torch.func`` (``vmap`` of ``jacrev`` of ``functional_call``), in
    chunks, with the Gram accumulated in float64 tile by tile. When the Jacobian of all examples does
    not fit in ``max_memory`` the rows are processed in blocks and the column chunks recomputed, so
    memory stays bounded (time grows by about ``n / (2·block)`` extra gradient passes).
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
Grams in float64, results moved to the CPU.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
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


class _Jacobian:
    """Per-example Jacobians of one model's outputs with respect to a selection, chunk by chunk."""

    def __init__(self, model: nn.Module, sels: list[ParamSelection], output: str, chunk_size: int):
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

    def chunk(self, batch: dict, idx: torch.Tensor, offset_name: str = "inputs") -> dict[str, torch.Tensor]:
        """Jacobians of the examples ``idx`` (after trimming common padding): group -> ``(b, o, p_g)``."""
        sub = _slice(batch, idx)
        sub["mask4d"] = additive_mask(sub["attention_mask"], self.wrapped.decoder, self.dtype)
        jac = torch.func.vmap(torch.func.jacrev(self._single), in_dims=(None, 0))(self.params, sub)
        out: dict[str, list] = {g: [] for g in self.groups}
        for s in self.sels:
            out[s.group].append(_take(s, jac["m." + s.name], 2))
        res = {g: (torch.cat(v, -1) if len(v) > 1 else v[0]).contiguous() for g, v in out.items()}
        for g, t in res.items():
            bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(1)
            if bool(bad.any()):
                i = int(idx[int(bad.nonzero()[0])])
                raise NTKError(f"non-finite gradient for example {i} of {offset_name} (parameter group {g}); "
                               "check that example's tokens/labels and the model's dtype")
        return res

    def blocks(self, batch: dict, idx: torch.Tensor, name: str = "inputs") -> Iterable[tuple[torch.Tensor, dict]]:
        """Yield ``(positions in idx, jacobian chunk)`` over ``idx`` in chunks of ``chunk_size``,
        grouping examples of similar length together (less padding) and keeping positions."""
        lengths = batch["attention_mask"][idx].sum(1)
        order = torch.argsort(lengths.cpu(), stable=True)
        for a in range(0, len(idx), self.chunk_size):
            pos = order[a:a + self.chunk_size]
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


def _gram_tile(A: torch.Tensor, B: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 Gram of Jacobian rows ``A (a, o1, d)`` and ``B (b, o2, d)`` in the layout of ``kind``."""
    A = A.double()
    B = B.double()
    a, o1, d = A.shape
    b, o2, _ = B.shape
    if kind == "full":
        return (A.reshape(a * o1, d) @ B.reshape(b * o2, d).T).reshape(a, o1, b, o2).permute(0, 2, 1, 3)
    if kind == "trace":
        return (A.reshape(a, o1 * d) @ B.reshape(b, o2 * d).T) / o1
    return torch.einsum("iad,jad->ija", A, B)


def _transpose_tile(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.permute(1, 0, 3, 2) if kind == "full" else t.transpose(0, 1)


def _kernel_shape(kind, n1, n2, o1, o2):
    return {"full": (n1, n2, o1, o2), "trace": (n1, n2), "diagonal": (n1, n2, o1)}[kind]


class _Accumulator:
    """Float64 kernel (and group kernels) on the CPU, filled tile by tile from Jacobian chunks."""

    def __init__(self, groups, kind, n1, n2, o1, o2, want_groups):
        shape = _kernel_shape(kind, n1, n2, o1, o2)
        self.kind = kind
        self.kernel = torch.zeros(shape, dtype=torch.float64)
        self.groups = {g: torch.zeros(shape, dtype=torch.float64) for g in groups} if want_groups else {}

    def add(self, JA: dict, JB: dict, ia: torch.Tensor, ib: torch.Tensor, mirror: bool) -> None:
        total = None
        same = JA is JB
        for g in JA:
            t = _gram_tile(JA[g], JB[g], self.kind)
            if same:  # a diagonal block: make it exactly symmetric
                t = 0.5 * (t + _transpose_tile(t, self.kind))
            total = t if total is None else total + t
            if self.groups:
                self._put(self.groups[g], t.cpu(), ia, ib, mirror)
        self._put(self.kernel, total.cpu(), ia, ib, mirror)

    def _put(self, K, t, ia, ib, mirror):
        ia, ib = ia.cpu(), ib.cpu()
        K[ia[:, None], ib[None, :]] = t
        if mirror:
            K[ib[:, None], ia[None, :]] = _transpose_tile(t, self.kind)


# --- exact ------------------------------------------------------------------------------------------------------


def _exact(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric, kind, want_groups, budget, o1, o2):
    n1 = b1["input_ids"].shape[0]
    n2 = n1 if symmetric else b2["input_ids"].shape[0]
    acc = _Accumulator(jf1.groups, kind, n1, n2, o1, o2, want_groups)
    itemsize = torch.finfo(jf1.dtype).bits // 8
    per_ex1 = o1 * jf1.p * itemsize
    chunk = jf1.chunk_size
    kernel_bytes = acc.kernel.numel() * 8 * (1 + len(acc.groups))
    def work_for(c):  # a stored row block + one streamed chunk + float64 copies of one group tile each
        return c * max(o1, o2) * jf1.p * itemsize + 2 * c * max(o1, o2) * max(jf1.group_sizes.values()) * 8

    # many outputs (o) make a default chunk too large for the budget: halve it until a block fits
    while chunk > 1 and int((budget - work_for(chunk)) // per_ex1) < chunk:
        chunk //= 2
    jf1.chunk_size = jf2.chunk_size = chunk
    work = work_for(chunk)
    rows = int((budget - work) // per_ex1)
    full_bytes = (n1 if symmetric else n1 + n2) * per_ex1
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
    return acc, {"gradient_passes": passes, "row_block": rows, "memory_budget": budget,
                 "full_jacobian_bytes": full_bytes}


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
                      block_rows: int | None = None, project_batch: int | None = None) -> Features:
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
    with tf32_disabled(), _eval_mode(model), torch.no_grad():
        o = jf.num_outputs(batch)
        if mode == "exact":
            fdt = feature_dtype or torch.float64
            F = torch.empty((n, o, jf.p), dtype=fdt)
            for pos, J in jf.blocks(batch, torch.arange(n, device=dev), "inputs"):
                F[pos] = torch.cat([J[g] for g in jf.groups], -1).to("cpu", fdt)
            slices, a = {}, 0
            for g in jf.groups:
                slices[g] = slice(a, a + jf.group_sizes[g])
                a += jf.group_sizes[g]
            return Features(F, slices, mode, output, _params_label(params), jf.p, dict(jf.group_sizes))
        proj = Projector(sels, sketch_dim, seed, projection, block_rows)
        fdt = feature_dtype or torch.float32
        F = torch.empty((n, o, proj.k), dtype=fdt)
        G = {g: torch.empty((n, o, proj.k), dtype=fdt) for g in jf.groups} if per_group else {}
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
        for pos, J in jf.blocks(batch, torch.arange(n, device=dev), "inputs"):
            buf.append((pos, J))
            count += len(pos)
            if count >= pb:
                flush()
                count = 0
        flush()
        return Features(F, G, mode, output, _params_label(params), jf.p, dict(jf.group_sizes), proj.k, seed,
                        projection)


def _params_label(params) -> str:
    return params if isinstance(params, str) else "custom"


def _default_chunk(device) -> int:
    # H100, MiniLM L=128: per-example gradients of 2,000 examples take 0.85 s at 64, 0.52 s at 256
    return 256 if torch.device(device).type == "cuda" else 8


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
    named = dict(model.named_parameters())
    missing = [n for n in delta_by_param_name if n not in named]
    if missing:
        raise NTKError(f"delta names parameters the model lacks: {missing[:5]}; names look like "
                       + ", ".join(list(named)[:5]))
    b = as_batch(inputs, _model_device(model))
    wrapped = _Wrapped(model)
    names = list(delta_by_param_name)
    primals = {"m." + n: named[n].detach() for n in names}
    tangents = {"m." + n: delta_by_param_name[n].to(named[n].dtype).to(named[n].device) for n in names}
    for n in names:
        if tangents["m." + n].shape != named[n].shape:
            raise NTKError(f"delta for {n} has shape {tuple(tangents['m.' + n].shape)}, "
                           f"parameter has {tuple(named[n].shape)}")

    def f(p):
        logits = torch.func.functional_call(wrapped, p, (b["input_ids"], b["attention_mask"],
                                                          b.get("token_type_ids")))
        return reduce_outputs(logits, b.get("labels"), output)

    with _eval_mode(model):
        f0, t = torch.func.jvp(f, (primals,), (tangents,))
    return f0.detach(), t.detach()


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
                  block_rows: int | None = None) -> NTKResult:
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
        chunk_size: examples per vmap call (default 256 on CUDA, 8 on CPU).
        max_memory: bytes (or "16GB") the exact path may hold in Jacobians; default
            :func:`default_memory_budget`.
        sketch_dim, seed, projection, block_rows: sketch settings (``mode="sketch"``).

    Returns:
        :class:`NTKResult` with ``.kernel`` (float64, CPU) and ``.groups``.
    """
    t0 = time.perf_counter()
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
            acc, info = _exact(jf1, jf2, b1, b2, symmetric, kernel, groups, budget, o1, o2)
            K, G = acc.kernel, acc.groups
        else:
            proj = Projector(sels1, sketch_dim, seed, projection, block_rows)

            def feats(jf, b, name):
                n = b["input_ids"].shape[0]
                F, Gs = None, {}
                for pos, J in jf.blocks(b, torch.arange(n, device=b["input_ids"].device), name):
                    tot, grp = proj.project(J, groups)
                    if F is None:
                        F = torch.empty((n,) + tuple(tot.shape[1:]), dtype=torch.float64, device=tot.device)
                        Gs = {g: torch.empty_like(F) for g in grp}
                    F[pos.to(F.device)] = tot.double()
                    for g, v in grp.items():
                        Gs[g][pos.to(F.device)] = v.double()
                return F, Gs

            F1, G1 = feats(jf1, b1, "inputs1")
            F2, G2 = (F1, G1) if symmetric else feats(jf2, b2, "inputs2")
            K = _gram_tile(F1, F2, kernel).cpu()
            G = {g: _gram_tile(G1[g], G2[g], kernel).cpu() for g in G1}
            info = {"features_bytes": F1.numel() * 8 * (1 + len(G1))}
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
    """
    import json
    from pathlib import Path

    from .finetune import load_run
    from .io import write_json
    from .modeling import load_tokenizer
    from .spectrum import spectrum_report
    from .tasks import Batches, Splits, load_saved_task

    run_dir = Path(run_dir)
    meta = load_run(run_dir)
    out = Path(out) if out is not None else run_dir / "ntk"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        res.save(out / f"{name}.safetensors")
        rep = spectrum_report(res, labels=batch["labels"].numpy(), num_boot=num_boot, seed=seed)
        rep.meta.update({"task": name, "examples": idx, "base_model": meta["base_model"]})
        write_json(out / f"{name}.spectrum.json", rep.to_json())
        summary[name] = {"alpha": rep.uncentered.decay.alpha if rep.uncentered.decay else None,
                         "participation_ratio": rep.uncentered.ranks.participation_ratio,
                         "alignment": rep.alignment, "kernel_ridge_cv_accuracy":
                             (rep.kernel_ridge or {}).get("cv_accuracy"), "seconds": res.seconds}
        models[name], inputs[name] = model, batch
    if cross and len(models) > 1:
        (out / "cross").mkdir(exist_ok=True)
        names = list(models)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                o_a, o_b = models[a].spec.num_labels, models[b].spec.num_labels
                kind = "trace" if (o_a == o_b or output != "logits") else "full"
                r = empirical_ntk(models[a], inputs[a], inputs[b], model2=models[b], params=params,
                                  output=output, mode=mode, kernel=kind, groups=False, sketch_dim=sketch_dim,
                                  seed=seed)
                r.save(out / "cross" / f"{a}__{b}.safetensors")
    write_json(out / "summary.json", summary)
    if plots:
        from .ntk_plots import plot_run

        plot_run(out)
    return summary
