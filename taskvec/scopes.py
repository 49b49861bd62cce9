"""Parameter scopes: which backbone parameters train, carry a task vector, or enter a kernel.

A scope is resolved against a concrete module into a list of :class:`ParamSelection`, one per
(parameter, matrix role) pair. A selection is either a whole tensor, or a set of row/column ranges
of a fused QKV tensor (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``), so that ``q`` on GPT-2 trains
exactly the Q columns of ``c_attn``.

Scope names (see ``docs/scopes.md``):

``full``
    every backbone parameter (embeddings, norms, MLPs, attention).
``attention``
    the attention weight matrices W_Q, W_K, W_V, W_O (same as ``qkvo``).
any combination of the letters ``q``, ``k``, ``v``, ``o``
    e.g. ``qkv`` (the attention-based kernel of Sun & Raskutti: W_Q, W_K, W_V of every layer, the
    default), ``q``, ``v``, ``qv``. Weight matrices only; biases are not included.
``re:<regex>``
    every parameter whose name matches the regular expression (``re.search``).
``lora``
    LoRA adapters through peft; resolved with :func:`lora_selection` on a peft model.

Groups: every selection carries a ``group`` label ``"<layer>.<role>"`` (e.g. ``"3.q"``), so kernels and
diagnostics can be reported per layer and per matrix; selections of ``full`` outside attention are
grouped by their parameter name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TaskvecError

ROLES = ("q", "k", "v", "o")


class ScopeError(TaskvecError, ValueError):
    """A scope name or parameter filter that cannot be resolved."""


@dataclass(frozen=True)
class ParamSelection:
    """One selected piece of one parameter tensor.

    Attributes:
        name: the parameter's name in ``module.named_parameters()``.
        group: ``"<layer>.<role>"`` for attention matrices (role in q/k/v/o), else the parameter name.
        role: ``"q"``, ``"k"``, ``"v"``, ``"o"`` or ``None`` (non-attention).
        dim: the dimension the ``ranges`` index into (``None`` = whole tensor).
        ranges: half-open index ranges ``((start, stop), ...)`` along ``dim``; empty = whole tensor.
        shape: the full parameter shape.
    """

    name: str
    group: str
    role: str | None
    shape: tuple[int, ...]
    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def is_whole(self) -> bool:
        return self.dim is None

    @property
    def numel(self) -> int:
        """Number of selected entries."""
        n = 1
        for s in self.shape:
            n *= s
        if self.is_whole:
            return n
        per = n // self.shape[self.dim]
        return per * sum(b - a for a, b in self.ranges)

    def index(self) -> torch.Tensor | None:
        """Long tensor of selected indices along ``dim`` (``None`` for a whole tensor)."""
        if self.is_whole:
            return None
        return torch.cat([torch.arange(a, b) for a, b in self.ranges])

    def mask(self, device=None) -> torch.Tensor:
        """Boolean tensor of the parameter's shape, True on selected entries."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=device)
        if self.is_whole:
            m.fill_(True)
            return m
        for a, b in self.ranges:
            m.narrow(self.dim, a, b - a).fill_(True)
        return m

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The selected entries of a full-shaped tensor (a view for whole tensors)."""
        if self.is_whole:
            return tensor
        return torch.index_select(tensor, self.dim, self.index().to(tensor.device))


# --- architecture patterns ------------------------------------------------------------------------
# (regex on the parameter name, role); the regex must capture the layer number as group 1.
_SEPARATE = [
    # BERT / RoBERTa / ELECTRA / MiniLM
    (r"(?:^|\.)layer\.(\d+)\.attention\.self\.query\.weight$", "q"),
    (r"(?:^|\.)layer\.(\d+)\.attention\.self\.key\.weight$", "k"),
    (r"(?:^|\.)layer\.(\d+)\.attention\.self\.value\.weight$", "v"),
    (r"(?:^|\.)layer\.(\d+)\.attention\.output\.dense\.weight$", "o"),
    # Llama / Mistral / Qwen / OPT / SmolLM
    (r"(?:^|\.)layers\.(\d+)\.self_attn\.q_proj\.weight$", "q"),
    (r"(?:^|\.)layers\.(\d+)\.self_attn\.k_proj\.weight$", "k"),
    (r"(?:^|\.)layers\.(\d+)\.self_attn\.v_proj\.weight$", "v"),
    (r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:o_proj|out_proj)\.weight$", "o"),
    # DistilBERT
    (r"(?:^|\.)layer\.(\d+)\.attention\.q_lin\.weight$", "q"),
    (r"(?:^|\.)layer\.(\d+)\.attention\.k_lin\.weight$", "k"),
    (r"(?:^|\.)layer\.(\d+)\.attention\.v_lin\.weight$", "v"),
    (r"(?:^|\.)layer\.(\d+)\.attention\.out_lin\.weight$", "o"),
    # GPT-2 output projection (the fused QKV is handled below)
    (r"(?:^|\.)h\.(\d+)\.attn\.c_proj\.weight$", "o"),
    # GPT-NeoX output projection
    (r"(?:^|\.)layers\.(\d+)\.attention\.dense\.weight$", "o"),
]
_GPT2_FUSED = re.compile(r"(?:^|\.)h\.(\d+)\.attn\.c_attn\.weight$")
_NEOX_FUSED = re.compile(r"(?:^|\.)layers\.(\d+)\.attention\.query_key_value\.weight$")
_SEPARATE_RE = [(re.compile(p), r) for p, r in _SEPARATE]


def _num_heads(module: nn.Module) -> int | None:
    cfg = getattr(module, "config", None)
    for attr in ("num_attention_heads", "n_head"):
        if cfg is not None and getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return None


def _attention_selections(module: nn.Module, roles: set[str]) -> list[ParamSelection]:
    out: list[ParamSelection] = []
    heads = _num_heads(module)
    for name, p in module.named_parameters():
        shape = tuple(p.shape)
        for rx, role in _SEPARATE_RE:
            m = rx.search(name)
            if m:
                if role in roles:
                    out.append(ParamSelection(name, f"{m.group(1)}.{role}", role, shape))
                break
        else:
            m = _GPT2_FUSED.search(name)
            if m:  # Conv1D weight (in, 3*hidden): Q, K, V are consecutive column blocks
                h = shape[1] // 3
                for i, role in enumerate("qkv"):
                    if role in roles:
                        out.append(ParamSelection(name, f"{m.group(1)}.{role}", role, shape, 1,
                                                  ((i * h, (i + 1) * h),)))
                continue
            m = _NEOX_FUSED.search(name)
            if m:  # Linear weight (3*hidden, hidden), rows interleaved per head: [q_h, k_h, v_h] blocks
                if heads is None:
                    raise ScopeError(f"{name}: fused QKV needs config.num_attention_heads to be sliced")
                d = shape[0] // (3 * heads)
                for i, role in enumerate("qkv"):
                    if role in roles:
                        rng = tuple((hd * 3 * d + i * d, hd * 3 * d + (i + 1) * d) for hd in range(heads))
                        out.append(ParamSelection(name, f"{m.group(1)}.{role}", role, shape, 0, rng))
    return out


def check_scope(scope: str) -> str:
    """``scope`` if it is a valid scope name (before any model is loaded), else :class:`ScopeError` listing the
    valid ones. Whether the scope matches parameters of a given model is checked by :func:`resolve_scope`."""
    if not isinstance(scope, str) or not scope.strip():
        raise ScopeError(f"scope must be a non-empty string, got {scope!r}")
    s = scope.strip().lower()
    if s in ("lora", "full", "attention"):
        return scope
    if scope.startswith("re:"):
        try:
            re.compile(scope[3:])
        except re.error as e:
            raise ScopeError(f"scope {scope!r}: not a regular expression ({e})") from None
        return scope
    if not set(s) <= set(ROLES):
        raise ScopeError(f"unknown scope {scope!r}; valid: full, attention, lora, letters from 'qkvo' "
                         "(e.g. qkv, qv, q, v), or re:<regex>")
    return scope


def resolve_scope(module: nn.Module, scope: str) -> list[ParamSelection]:
    """Resolve a scope name against ``module`` into parameter selections.

    Args:
        module: any ``nn.Module`` (a transformers backbone, a :class:`~taskvec.modeling.TaskModel`, ...).
            Names in the result are those of ``module.named_parameters()``.
        scope: ``"full"``, ``"attention"``, letters from ``qkvo`` (``"qkv"``, ``"qv"``, ...), or
            ``"re:<regex>"``.

    Returns:
        Selections in parameter order. Raises :class:`ScopeError` naming what exists when nothing matches.
    """
    check_scope(scope)
    s = scope.strip().lower()
    if s == "lora":
        raise ScopeError("scope 'lora' is resolved on a peft model: use taskvec.scopes.lora_selection(peft_model)")
    if s == "full":
        return [ParamSelection(n, n, None, tuple(p.shape)) for n, p in module.named_parameters()]
    if scope.startswith("re:"):
        rx = re.compile(scope[3:])
        sel = [ParamSelection(n, n, None, tuple(p.shape)) for n, p in module.named_parameters() if rx.search(n)]
        if not sel:
            raise ScopeError(f"parameter filter {scope!r} matches no parameter; names look like: "
                             + ", ".join(n for n, _ in list(module.named_parameters())[:8]) + ", ...")
        return sel
    if s == "attention":
        s = "qkvo"
    if not set(s) <= set(ROLES):
        raise ScopeError(f"unknown scope {scope!r}; valid: full, attention, lora, letters from 'qkvo' "
                         "(e.g. qkv, qv, q, v), or re:<regex>")
    sel = _attention_selections(module, set(s))
    if not sel:
        names = [n for n, _ in module.named_parameters()]
        raise ScopeError(f"scope {scope!r} found no attention matrices in {type(module).__name__} "
                         f"(supported: BERT-family, DistilBERT, Llama-family, GPT-2, GPT-NeoX); "
                         f"its parameters look like: {', '.join(names[:6])}, ... (use re:<regex>)")
    return sel


def lora_selection(module: nn.Module) -> list[ParamSelection]:
    """Selections for the LoRA parameters (``lora_A`` / ``lora_B``) of a peft model."""
    sel = [ParamSelection(n, n, None, tuple(p.shape)) for n, p in module.named_parameters()
           if "lora_A" in n or "lora_B" in n or "lora_embedding" in n]
    if not sel:
        raise ScopeError(f"{type(module).__name__} has no LoRA parameters (lora_A/lora_B)")
    return sel


def lora_target_modules(module: nn.Module, scope: str = "qv") -> list[str]:
    """peft ``target_modules`` (module-name suffixes) covering the attention roles of ``scope``.

    Fused QKV modules (GPT-2 ``c_attn``) cannot be split by LoRA: any of q/k/v selects the whole module.
    """
    names = set()
    for s in resolve_scope(module, scope):
        mod_name = s.name.rsplit(".", 1)[0]
        names.add(mod_name.rsplit(".", 1)[-1])
    return sorted(names)


def selection_numel(selections: list[ParamSelection]) -> int:
    """Total number of selected entries p."""
    return sum(s.numel for s in selections)


def freeze_outside(module: nn.Module, selections: list[ParamSelection]) -> list:
    """Make exactly the selected entries trainable.

    Sets ``requires_grad`` on the selected parameters only, and registers gradient hooks that zero the
    gradient outside the selected slices of partially selected (fused) tensors. Returns the hook handles.
    Partially selected tensors must not get weight decay (it would move the frozen entries): the
    fine-tuning loop puts them in a no-decay group.
    """
    params = dict(module.named_parameters())
    by_name: dict[str, list[ParamSelection]] = {}
    for s in selections:
        by_name.setdefault(s.name, []).append(s)
    for name, p in params.items():
        p.requires_grad_(name in by_name)
    handles = []
    for name, sels in by_name.items():
        if all(s.is_whole for s in sels):
            continue
        mask = torch.zeros(sels[0].shape, dtype=torch.bool)
        for s in sels:
            mask |= s.mask()
        p = params[name]
        mask = mask.to(p.device)
        handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
    return handles


def partial_param_names(selections: list[ParamSelection]) -> set[str]:
    """Names of parameters that are only partially selected (fused QKV slices)."""
    return {s.name for s in selections if not s.is_whole}
