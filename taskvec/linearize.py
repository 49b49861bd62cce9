"""The linearised model: f(x; θ0 + Δ) ≈ f(x; θ0) + J(x)·Δ (+ ½·D²f(x; θ0)[Δ, Δ]).

Jacobian-vector products are computed with forward-mode AD (``torch.func.jvp`` over
``torch.func.functional_call``), never by forming J. Only the tensors that Δ touches are primals; every
other parameter and buffer stays fixed. The second directional derivative comes from a nested JVP.
Forward-mode AD has no rule for fused SDPA attention: load models with ``attn_implementation="eager"``
(the default of :func:`taskvec.modeling.load_backbone` / ``load_task_model``).

Known PyTorch pitfall (found here, torch 2.13): forward-over-forward AD through the native
``layer_norm`` kernel gives a wrong second derivative (errors of order 1 on random inputs), while
first-order JVPs are right. The nested JVP therefore runs with ``F.layer_norm`` replaced by its
composite definition (mean, variance, rsqrt), which is tested against finite differences.

Shapes: a batch of ``B`` examples with ``o`` outputs (class logits) gives ``f0``, ``Jd`` and ``Hdd`` of
shape ``(B, o)``; over a whole split ``(n, o)``. Deltas are dicts ``{backbone-relative name: tensor}``
(a :class:`~taskvec.task_vector.TaskVector`'s ``deltas``) in the units of the weights.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jvp

from .errors import TaskvecError
from .modelfn import eval_mode, reduce_outputs, wrap_model


def _composite_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    y = (x - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@contextlib.contextmanager
def composite_layer_norm():
    """Temporarily route ``torch.nn.functional.layer_norm`` through its composite definition."""
    import torch.nn.functional as F

    native = F.layer_norm
    F.layer_norm = _composite_layer_norm
    try:
        yield
    finally:
        F.layer_norm = native


def _backbone_prefix(model: nn.Module) -> str:
    return "backbone." if hasattr(model, "backbone") else ""


def _primals_and_tangents(model: nn.Module, deltas: dict[str, torch.Tensor]):
    params = dict(model.named_parameters())
    pre = _backbone_prefix(model)
    names, primals, tangents = [], [], []
    for k, d in deltas.items():
        name = pre + k if pre + k in params else k
        if name not in params:
            raise TaskvecError(f"tensor {k!r} of the delta is not a parameter of {type(model).__name__}")
        p = params[name]
        if p.shape != d.shape:
            raise TaskvecError(f"tensor {k!r}: delta shape {tuple(d.shape)} vs parameter shape {tuple(p.shape)}")
        names.append(name)
        primals.append(p.detach())
        tangents.append(d.to(p.device, p.dtype))
    return names, tuple(primals), tuple(tangents)


def _call(model, names, batch, output: str = "logits", keep_dtype: bool = False):
    """``f(*params) -> (B, o)`` outputs of ``model`` on ``batch`` as a function of the parameters ``names``.

    Task models and plain classifiers (``.logits``) alike, through :class:`taskvec.modelfn.ModelFn`; ``output``
    as :func:`taskvec.modelfn.reduce_outputs` (``logits`` | ``margin`` | ``loss`` | ``loglik``); float32 unless
    ``keep_dtype``.
    """
    wrapped = wrap_model(model)
    keys = ["m." + n for n in names]

    def f(*ps):
        out = functional_call(wrapped, dict(zip(keys, ps)),
                              (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")),
                              strict=False)
        out = reduce_outputs(out, batch.get("labels"), output)
        return out if keep_dtype else out.float()
    return f


def jvp_batch(model: nn.Module, batch: dict, deltas: dict[str, torch.Tensor], second_order: bool = False,
              output: str = "logits", keep_dtype: bool = False):
    """``(f0, J·Δ, D²f[Δ, Δ] or None)`` on one tokenised batch, each ``(B, o)`` (float32 unless ``keep_dtype``).

    The one forward-mode engine of taskvec (:func:`taskvec.ntk.jvp_outputs` calls it too). ``deltas`` are
    keyed by backbone-relative or full parameter names; ``output`` is ``logits`` (o = classes), ``margin``
    or ``loss`` (o = 1, needs ``batch["labels"]``). ``model`` is in eval mode for the call (dropout off).
    ``second_order`` costs a nested JVP (run with a composite layer norm, see the module docstring).
    """
    with eval_mode(model):
        names, primals, tangents = _primals_and_tangents(model, deltas)
        f = _call(model, names, batch, output, keep_dtype)
        if not second_order:
            f0, jd = jvp(f, primals, tangents)
            return f0.detach(), jd.detach(), None

        def first(*ps):
            return jvp(f, ps, tangents)

        with composite_layer_norm():
            (f0, jd), (_, hdd) = jvp(first, primals, tangents)
        return f0.detach(), jd.detach(), hdd.detach()


@dataclass
class Directional:
    """Outputs of one model on one split along several directions.

    Attributes:
        f0: ``(n, o)`` outputs at θ0.
        labels: ``(n,)`` integer labels.
        jvps: ``{direction name: (n, o)}`` first-order changes J·Δ.
        hvps: ``{direction name: (n, o)}`` second directional derivatives D²f[Δ, Δ] (when requested).
    """

    f0: torch.Tensor
    labels: torch.Tensor
    jvps: dict
    hvps: dict

    def predict(self, coefs: dict[str, float], second_order: bool = False) -> torch.Tensor:
        """Predicted outputs ``f0 + Σ_d c_d·J·Δ_d`` (``(n, o)``).

        With ``second_order`` and directions that were computed with Hessian terms, adds the diagonal
        second-order terms ``½·Σ_d c_d²·D²f[Δ_d, Δ_d]`` (cross terms between directions are not included;
        compute the merged direction itself for the exact second-order term along it).
        """
        out = self.f0.clone()
        for d, c in coefs.items():
            out += c * self.jvps[d]
            if second_order and d in self.hvps:
                out += 0.5 * c * c * self.hvps[d]
        return out


def _rows(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every per-example tensor of ``batch`` (first dimension = examples)."""
    n = batch["input_ids"].shape[0]
    return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in batch.items()}


def _stack(directions: list[dict], keys: list[str], primals) -> list[torch.Tensor]:
    """One ``(k, *shape)`` tangent per tensor over ``k`` directions (zeros where a direction lacks it)."""
    return [torch.stack([d[k].to(p.device, p.dtype) if k in d else torch.zeros_like(p) for d in directions])
            for k, p in zip(keys, primals)]


def _jvp_vmapped(model: nn.Module, names, primals, keys, batch: dict, directions: list[dict],
                 output: str = "logits"):
    """``(f0 (B, o), J·Δ (k, B, o))`` for ``k`` directions on one batch: one vmapped JVP."""
    from torch.func import vmap

    f = _call(model, names, batch, output)

    def one(*tangents):
        return jvp(f, primals, tangents)

    f0, jd = vmap(one, out_dims=(None, 0))(*_stack(directions, keys, primals))  # primal shared by the tangents
    return f0.detach(), jd.detach()


@dataclass
class JVPPlan:
    """How :func:`jvp_many` splits one batch to stay inside a memory budget (all sizes in bytes).

    Attributes:
        examples: examples per chunk (rows of the batch evaluated together).
        directions: directions per chunk (tangents vmapped together).
        budget: the budget the plan was made for.
        per_example: measured bytes per example of the primal pass (plus the margin).
        per_example_direction: measured bytes per example and direction of the tangent pass (plus the margin).
        tangent_bytes: bytes of one direction's stacked tangents (the delta tensors).
        estimate: predicted peak of one chunk, ``directions·tangent_bytes + examples·(per_example +
            directions·per_example_direction)``.
    """

    examples: int
    directions: int
    budget: int
    per_example: int
    per_example_direction: int
    tangent_bytes: int
    estimate: int


#: margin on the measured probe: allocator rounding and kernels' workspaces the count does not see
PLAN_MARGIN = 1.5
_PROBES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def default_jvp_budget(device) -> int:
    """Bytes :func:`jvp_many` may use by default: 60% of free GPU memory, or 40% of ``MemAvailable`` in
    ``/proc/meminfo`` on the CPU (read at each call: what the machine has free now)."""
    from .ntk.schedules import default_memory_budget

    return default_memory_budget(device)


def parse_budget(max_memory) -> int | float:
    """A memory budget in bytes from ``16e9``, ``"16GB"``, ``"512MiB"`` or ``float("inf")`` (no limit);
    raises :class:`TaskvecError` for anything else or a budget that is not positive."""
    from .ntk.schedules import parse_bytes

    if isinstance(max_memory, float) and max_memory == float("inf"):
        return max_memory
    try:
        b = parse_bytes(max_memory)
    except (ValueError, TypeError, OverflowError):
        b = None
    if isinstance(max_memory, bool) or b is None or b <= 0:
        raise TaskvecError(f"max_memory: expected a positive number of bytes or a size such as '4GB', got "
                           f"{max_memory!r}")
    return b


def _probe(model, names, primals, keys, batch, directions, output: str = "logits") -> tuple[int, int]:
    """Measured peak bytes ``(one example · one direction, one example · two directions)`` (the second is
    ``None`` for a single direction), cached per model, tensor set and output by padded length ``L``: a probe
    of a length ≥ ``L`` is reused (memory does not shrink with the length), so probing the longest batch
    first (:func:`directional_outputs` does) serves every shorter one."""
    from .tensor_memory import LiveTensorBytes

    L = int(batch["input_ids"].shape[1])
    ck = (tuple(batch["input_ids"].shape[2:]), tuple(keys), len(directions) > 1, str(primals[0].device), output)
    cache = _PROBES.setdefault(model, {}).setdefault(ck, {})
    longer = [n for n in cache if n >= L]
    if longer:
        return cache[min(longer)]
    one = _rows(batch, 0, 1)
    peaks = []
    for k in ((1, 2) if len(directions) > 1 else (1,)):
        with LiveTensorBytes() as m:
            _jvp_vmapped(model, names, primals, keys, one, directions[:k], output)
        peaks.append(m.peak)
    cache[L] = (peaks[0], peaks[1] if len(peaks) > 1 else None)
    return cache[L]


def jvp_plan(model: nn.Module, batch: dict, directions: list[dict[str, torch.Tensor]],
             max_memory=None, output: str = "logits") -> JVPPlan:
    """The chunking :func:`jvp_many` uses for ``batch`` and ``directions`` under ``max_memory``.

    One example along one and two directions is run under :class:`~taskvec.tensor_memory.LiveTensorBytes`
    (peak bytes of the tensors it allocates); the cost is linear in the examples of a chunk (fixed padded
    length) and in its directions, so ``per_example`` and ``per_example_direction`` follow, times
    :data:`PLAN_MARGIN`. All directions go together when they fit (the primal pass is shared), then as many
    examples as fit; otherwise fewer directions per chunk. ``max_memory``: bytes or a string (``"4GB"``);
    default :func:`default_jvp_budget`. Raises :class:`TaskvecError` when one example along one direction
    does not fit.
    """
    from .ntk.schedules import _fmt_bytes

    union = _union(directions)
    names, primals, _ = _primals_and_tangents(model, union)
    keys = list(union)
    n, D = batch["input_ids"].shape[0], len(directions)
    budget = parse_budget(max_memory) if max_memory is not None else default_jvp_budget(primals[0].device)
    if budget == float("inf"):
        return JVPPlan(n, D, 0, 0, 0, 0, 0)
    tangent = sum(p.numel() * p.element_size() for p in primals)
    with eval_mode(model):
        p1, p2 = _probe(model, names, primals, keys, batch, directions, output)
    per_dir = max(p2 - p1 - tangent, 0) if p2 is not None else max(p1 - tangent, 0)
    per_ex = max(p1 - tangent - per_dir, 0)
    per_dir, per_ex = int(PLAN_MARGIN * per_dir), int(PLAN_MARGIN * per_ex)

    def peak(c, k):
        return k * tangent + c * (per_ex + k * per_dir)

    k = int(max(1, min(D, (budget - per_ex) // max(tangent + per_dir, 1))))  # most directions one example allows
    if peak(1, k) > budget:
        T = batch["input_ids"].shape[1]
        raise TaskvecError(f"jvp_many: one example of {T} tokens along one direction needs about "
                           f"{_fmt_bytes(peak(1, 1))} but the memory budget is {_fmt_bytes(budget)}; lower the "
                           "sequence length (max_length) or raise max_memory (validate.max_memory)")
    c = max(1, min(n, (budget - k * tangent) // max(per_ex + k * per_dir, 1)))
    return JVPPlan(int(c), k, budget, per_ex, per_dir, tangent, peak(int(c), k))


def _union(directions: list[dict]) -> dict:
    if not directions:
        raise TaskvecError("jvp_many needs at least one direction")
    union: dict[str, torch.Tensor] = {}
    for d in directions:
        for k, v in d.items():
            union.setdefault(k, v)
    return union


def jvp_many(model: nn.Module, batch: dict, directions: list[dict[str, torch.Tensor]], max_memory=None,
             plan: JVPPlan | None = None, output: str = "logits"):
    """``(f0, [J·Δ_d for each d])`` on one batch, the directions vmapped together within a memory budget.

    The primal forward pass is shared by the directions of a chunk (``torch.func.vmap`` over the tangents
    only), so ``D`` directions cost one forward plus ``D`` batched tangent passes instead of ``D`` separate
    JVPs. Directions may touch different tensors (a missing tensor is a zero tangent). ``f0`` and each
    ``J·Δ_d`` are ``(B, o)`` float32, in the units of the outputs (logits) per unit step along Δ_d.

    Memory: the batch is split into chunks of examples and directions (:func:`jvp_plan`, or the ``plan``
    given) whose estimated peak fits ``max_memory`` (bytes or ``"4GB"``; default :func:`default_jvp_budget`);
    the results equal the unchunked ones up to float round-off. ``max_memory=float("inf")`` runs everything
    in one chunk (no probe). ``output`` as :func:`jvp_batch` (``loglik``: an LM task model's per-example
    log-likelihood in nats, o = 1).
    """
    union = _union(directions)
    names, primals, _ = _primals_and_tangents(model, union)
    keys = list(union)
    n, D = batch["input_ids"].shape[0], len(directions)
    with eval_mode(model):
        plan = plan if plan is not None else jvp_plan(model, batch, directions, max_memory, output)
        f0s, outs = [], [[] for _ in range(D)]
        for e0 in range(0, n, plan.examples):
            sub = _rows(batch, e0, e0 + plan.examples)
            for d0 in range(0, D, plan.directions):
                try:
                    f0, jd = _jvp_vmapped(model, names, primals, keys, sub, directions[d0:d0 + plan.directions],
                                          output)
                except (MemoryError, RuntimeError) as e:
                    if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
                        raise
                    raise TaskvecError(f"jvp_many ran out of memory on a chunk of {plan.examples} examples × "
                                       f"{plan.directions} directions ({type(e).__name__}); lower max_memory "
                                       "(validate.max_memory) or the sequence length") from None
                if d0 == 0:
                    f0s.append(f0)
                for i in range(jd.shape[0]):
                    outs[d0 + i].append(jd[i])
        return torch.cat(f0s), [torch.cat(o) for o in outs]


@contextlib.contextmanager
def fast_attention(model: nn.Module):
    """Run plain forward passes with SDPA attention where transformers allows switching at run time.

    Forward-mode AD needs eager attention, forward passes do not; SDPA is faster (about 1.3x for MiniLM on
    CPU). Models whose attention class is fixed at construction simply keep it (same results either way, up
    to float round-off).
    """
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            try:
                c._attn_implementation = "sdpa"
            except (ValueError, AttributeError, ImportError):
                pass
        yield model
    finally:
        for c, v in zip(configs, saved):
            c._attn_implementation = v


@torch.no_grad()
def forward_outputs(model: nn.Module, batches, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs (n, o), labels (n,))`` of plain forward passes over ``batches``, on the CPU, in the model's
    dtype; eval mode and SDPA attention (:func:`fast_attention`) for the duration of the call."""
    dev = device if device is not None else next(model.parameters()).device
    outs, ys = [], []
    with eval_mode(model), fast_attention(model):
        for b in batches:
            b = {k: v.to(dev) for k, v in b.items()}
            outs.append(model(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).cpu())
            ys.append(b["labels"].cpu())
    return torch.cat(outs), torch.cat(ys)


FD_FIRST_STEP = 1e-5  # step of the one-sided float64 differences for first-order-only directions
#: (central step h, one-sided step h1) of the finite differences per precision: float64 by default; float32
#: halves the cost at relative errors of about 1e-3 of the terms (measured on MiniLM: docs/validation.md)
FD_STEPS = {torch.float64: (1e-3, FD_FIRST_STEP), torch.float32: (3e-2, 3e-3)}


@torch.no_grad()
def finite_difference_derivatives(model: nn.Module, batches, directions: dict[str, dict[str, torch.Tensor]],
                                  h: float = 1e-3, device=None, first_only: dict | None = None,
                                  h1: float = FD_FIRST_STEP, dtype: torch.dtype = torch.float64
                                  ) -> tuple[dict, dict]:
    """J·Δ_d and D²f[Δ_d, Δ_d] for every direction by central differences of float64 forward passes.

    On a float64 copy of ``model``: ``(f(θ0 + hΔ) − f(θ0 − hΔ)) / 2h`` and
    ``(f(θ0 + hΔ) − 2·f(θ0) + f(θ0 − hΔ)) / h²``, two forward passes per direction (plus one at θ0), against
    about three forward passes for a JVP and ten for a nested JVP. With ``h`` the step along Δ
    (dimensionless), the truncation errors relative to the terms are about ``h²·ρ²/6`` and ``h²·ρ²/12`` (ρ =
    the Taylor series' ratio along Δ, below 1 wherever a second-order prediction is trusted) and the float64
    round-off about ``1e-16·|f| / (h·|J·Δ|)`` and ``1e-16·|f| / (h²·|D²f|)``: with the default ``h = 1e-3``
    all are far below float32 resolution for merge-sized Δ (tested against float64 JVPs).

    ``first_only`` directions get J·Δ alone, by a one-sided difference ``(f(θ0 + h1·Δ) − f(θ0)) / h1`` that
    reuses f(θ0): one float64 forward each (a float32 forward-mode JVP costs several forwards on a CPU).
    With ``h1 = 1e-5`` its truncation error is about ``h1·ρ/2`` = 5e-6·ρ of the term and its round-off
    1e-11·|f|/|J·Δ|: float32 resolution, as the JVP's own.
    Returns ``({d: (n, o)}, {d: (n, o)})`` float32 on the CPU (``first_only`` directions in the first only).
    """
    import copy

    m64 = copy.deepcopy(model).to(dtype).eval()
    if device is not None:
        m64 = m64.to(device)
    named = dict(m64.named_parameters())
    first, second = {}, {}
    f0 = forward_outputs(m64, batches)[0]
    for d, delta in directions.items():
        names, _, tangents = _primals_and_tangents(m64, delta)
        orig = [named[n].detach().clone() for n in names]
        fs = []
        for sign in (1.0, -1.0):
            for n, o, t in zip(names, orig, tangents):
                named[n].copy_(o + sign * h * t)
            fs.append(forward_outputs(m64, batches)[0])
        for n, o in zip(names, orig):
            named[n].copy_(o)
        first[d] = ((fs[0] - fs[1]) / (2 * h)).float()
        second[d] = ((fs[0] - 2 * f0 + fs[1]) / (h * h)).float()
    for d, delta in (first_only or {}).items():
        names, _, tangents = _primals_and_tangents(m64, delta)
        orig = [named[n].detach().clone() for n in names]
        for n, o, t in zip(names, orig, tangents):
            named[n].copy_(o + h1 * t)
        f1 = forward_outputs(m64, batches)[0]
        for n, o in zip(names, orig):
            named[n].copy_(o)
        first[d] = ((f1 - f0) / h1).float()
    return first, second


def directional_outputs(model: nn.Module, batches, directions: dict[str, dict[str, torch.Tensor]],
                        second_order: bool = False, device=None, batched: bool = True,
                        second_order_method: str = "fd", fd_step: float | None = None, max_memory=None,
                        first_only: dict | None = None, fd_dtype: torch.dtype = torch.float64) -> Directional:
    """f0 and J·Δ_d (and D²f[Δ_d, Δ_d] with ``second_order``) for every direction ``d`` over all batches.

    First order only: forward-mode JVPs, all directions of a batch together (:func:`jvp_many`, one shared
    primal pass) unless ``batched=False``. With ``second_order``: ``second_order_method="fd"`` (default)
    takes both terms from :func:`finite_difference_derivatives` (float64 central differences, two forward
    passes per direction); ``"jvp"`` a nested JVP per direction and batch (exact to float32 round-off,
    several times slower). ``f0`` is always the float32 forward pass. ``max_memory``: the budget of each
    batch's batched JVP (:func:`jvp_many`; bytes or ``"4GB"``, default :func:`default_jvp_budget`).
    ``first_only`` (with the ``"fd"`` second order): more directions that get J·Δ alone, from one-sided
    float64 differences sharing the float64 f(θ0) (:func:`finite_difference_derivatives`). ``fd_dtype``: the
    precision of the differences (steps from :data:`FD_STEPS` unless ``fd_step`` is given).
    """
    if second_order_method not in ("fd", "jvp"):
        raise TaskvecError(f"second_order_method must be 'fd' or 'jvp', got {second_order_method!r}")
    use_fd = second_order and second_order_method == "fd"
    nested = second_order and not use_fd
    if use_fd or not directions:
        f0, labels = forward_outputs(model, batches, device)
        h, h1 = FD_STEPS.get(fd_dtype, FD_STEPS[torch.float64])
        jvps, hvps = (finite_difference_derivatives(model, batches, directions, h=fd_step or h, device=device,
                                                    first_only=first_only, h1=h1, dtype=fd_dtype)
                      if use_fd else ({}, {}))
        return Directional(f0.float(), labels, jvps, hvps)
    if first_only:
        raise TaskvecError("first_only directions need second_order=True with second_order_method='fd'")
    f0s, ys = [], []
    jv: dict[str, list] = {d: [] for d in directions}
    hv: dict[str, list] = {d: [] for d in directions} if nested else {}
    if batched and not nested and len(directions) >= 2 and max_memory != float("inf") and iter(batches) is not batches:
        longest = max(batches, key=lambda b: b["input_ids"].shape[1], default=None)  # one probe serves all
        if longest is not None:
            lb = {k: v.to(device) for k, v in longest.items()} if device is not None else longest
            jvp_plan(model, lb, list(directions.values()), max_memory)
    for b in batches:
        if device is not None:
            b = {k: v.to(device) for k, v in b.items()}
        if nested or not batched or len(directions) < 2:
            f0 = None
            for d, delta in directions.items():
                f, j, hdd = jvp_batch(model, b, delta, nested)
                f0 = f if f0 is None else f0
                jv[d].append(j.cpu())
                if nested:
                    hv[d].append(hdd.cpu())
        else:
            f0, js = jvp_many(model, b, list(directions.values()), max_memory=max_memory)
            for d, j in zip(directions, js):
                jv[d].append(j.cpu())
        f0s.append(f0.cpu())
        ys.append(b["labels"].cpu())
    jvps, hvps = {d: torch.cat(v) for d, v in jv.items()}, {d: torch.cat(v) for d, v in hv.items()}
    return Directional(torch.cat(f0s), torch.cat(ys), jvps, hvps)


def relative_linearisation_error(f_true: torch.Tensor, f0: torch.Tensor, f_lin: torch.Tensor) -> float:
    """‖f(θ0+Δ) − f_lin‖ / ‖f(θ0+Δ) − f0‖ over all examples and outputs (the trust signal)."""
    den = float((f_true - f0).norm())
    return float((f_true - f_lin).norm()) / den if den > 0 else 0.0


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of argmax predictions equal to the labels."""
    return float((logits.argmax(-1) == labels).float().mean())


def vjp_params(model: nn.Module, batches, cotangents: torch.Tensor, names: list[str], device=None
               ) -> dict[str, torch.Tensor]:
    """Jᵀ·w: Σ_i Σ_a w[i, a]·∂f_a(x_i)/∂θ for the parameters ``names`` (backbone-relative or full names).

    ``cotangents`` has shape ``(n, o)`` in the order of the batches' examples. Returns ``{name: tensor}``
    with the parameters' shapes (float32), keyed as given. One reverse pass per batch.
    """
    many = vjp_params_many(model, batches, cotangents[None], names, device=device)
    return {k: v[0] for k, v in many.items()}


def vjp_params_many(model: nn.Module, batches, cotangents: torch.Tensor, names: list[str], device=None
                    ) -> dict[str, torch.Tensor]:
    """Jᵀ·w_m for ``m`` cotangents at once: ``cotangents`` ``(m, n, o)`` -> ``{name: (m, *shape)}`` float32.

    One forward pass per batch, then ``m`` reverse passes through the retained graph.
    """
    if cotangents.dim() != 3:
        raise TaskvecError(f"cotangents must have shape (m, n, o), got {tuple(cotangents.shape)}")
    params = dict(model.named_parameters())
    pre = _backbone_prefix(model)
    full = [pre + k if pre + k in params else k for k in names]
    missing = [k for k, f in zip(names, full) if f not in params]
    if missing:
        raise TaskvecError(f"{missing[:3]} are not parameters of {type(model).__name__}")
    m = cotangents.shape[0]
    out = {k: torch.zeros((m, *params[f].shape), dtype=torch.float32, device=params[f].device)
           for k, f in zip(names, full)}
    req = {f: params[f].requires_grad for f in full}
    with eval_mode(model):
        try:
            for f in full:
                params[f].requires_grad_(True)
            start = 0
            for b in batches:
                if device is not None:
                    b = {k: v.to(device) for k, v in b.items()}
                n = b["input_ids"].shape[0]
                w = cotangents[:, start:start + n].to(params[full[0]].device)
                start += n
                with torch.enable_grad():
                    y = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).float()
                    for i in range(m):
                        grads = torch.autograd.grad((y * w[i]).sum(), [params[f] for f in full], allow_unused=True,
                                                    retain_graph=i < m - 1)
                        for k, g in zip(names, grads):
                            if g is not None:
                                out[k][i] += g.float()
            if start != cotangents.shape[1]:
                raise TaskvecError(f"cotangents have {cotangents.shape[1]} rows for {start} examples")
        finally:
            for f, r in req.items():
                params[f].requires_grad_(r)
    return out
