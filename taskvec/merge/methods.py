"""Merge methods: pure functions over tensors, and the registry that declares their parameters.

Every method has the signature ``fn(base, deltas, weights, **params) -> delta``:

* ``base`` — the base tensor θ0 of one parameter, shape ``S`` (any shape; floating point).
* ``deltas`` — list of T task deltas τ_t = θ_t − θ0, each of shape ``S`` and ``base``'s dtype. Methods may
  modify them in place (the engine hands over tensors it no longer needs).
* ``weights`` — list of T floats w_t (the per-model ``weight`` evaluated for this tensor).
* ``params`` — the method's parameters already evaluated for this tensor; per-model parameters (such
  as ``density``) arrive as lists of T values.

The result is the merged delta Δ of shape ``S``; the merged tensor is θ0 + Δ. Definitions follow
mergekit where it has the method (see ``/work/shared/THEORY.md``, "Merge methods", and ``docs/merge.md``).

Tie rule for magnitude pruning (``ties``, ``breadcrumbs``): entries are ranked by |τ| descending and,
among equal magnitudes, by flat (row-major) index ascending; the first k in that order are kept.
mergekit instead keeps whatever an unstable ``argsort`` puts first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import TaskvecError


class MergeError(TaskvecError, ValueError):
    """A merge that cannot be done: bad config, bad parameters, or inputs that do not fit together."""


# --- selection primitives -------------------------------------------------------------------------


CHUNK = 1 << 18  # elements per chunk of streamed element-wise work (1 MiB of float32: stays in cache)
SAMPLE_MIN_N = 1 << 16  # tensors at least this large bracket their top-k threshold with a sample
SAMPLE_SIZE = 1 << 15


@dataclass
class TopK:
    """The top-k rule in streaming form: keep |x| > ``v``, plus the entries at flat positions ``tie_idx``
    (the first entries with |x| == ``v`` in flat order: the tie rule). :meth:`take` masks any chunk."""

    v: float
    tie_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def take(self, a: torch.Tensor, start: int) -> torch.Tensor:
        """Mask of the kept entries of the chunk ``a`` = |x|[start : start + len(a)]."""
        m = a > self.v
        if self.tie_idx.numel():
            t = self.tie_idx
            t = t[(t >= start) & (t < start + a.numel())] - start
            if t.numel():
                m[t.to(m.device)] = True
        return m


def select_topk(abs_chunk, n: int, k: int, sample: torch.Tensor | None = None, pmap=map) -> TopK:
    """The :class:`TopK` rule keeping the k largest of n magnitudes, ties by lower flat index.

    Exact and O(n): a sorted random ``sample`` of the magnitudes brackets the k-th largest value, one
    streamed pass counts the entries above the bracket and collects those inside it (with their
    positions), and ``kthvalue`` runs on that small set; if the bracket misses (or there is no sample)
    all magnitudes are gathered. The sample only affects speed, never the result.

    Args:
        abs_chunk: ``abs_chunk(start)`` returns |x| (float32/64) at flat positions start .. start+CHUNK.
        n: number of entries. k: number kept, 0 ≤ k ≤ n.
        sample: optional sorted 1-D tensor of magnitudes at random positions.
        pmap: a ``map`` (e.g. a thread pool's) applied over chunk starts; results are used in order.
    """
    if k >= n:
        return TopK(-math.inf)
    if k <= 0:
        return TopK(math.inf)
    starts = range(0, n, CHUNK)
    if sample is not None and sample.numel() >= 64:
        s = sample.numel()
        q = 1.0 - k / n
        margin = 6.0 * math.sqrt(s * q * (1 - q)) + 8
        lo = float(sample[max(0, int(q * s - margin))])
        hi = float(sample[min(s - 1, int(q * s + margin))])

        def scan(start):
            a = abs_chunk(start)
            inside = (a > lo) & (a <= hi)
            return int(torch.count_nonzero(a > hi)), a[inside], torch.nonzero(inside).squeeze(1) + start

        parts = list(pmap(scan, starts))
        above = sum(p[0] for p in parts)
        band, pos = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        need = k - above
        if 0 < need <= band.numel():
            v = torch.kthvalue(band, band.numel() - need + 1).values
            ties = k - above - int(torch.count_nonzero(band > v))
            return TopK(float(v), pos[band == v][:ties])
    a = torch.cat(list(pmap(lambda start: abs_chunk(start).clone(), starts)))
    v = torch.kthvalue(a, n - k + 1).values
    ties = k - int(torch.count_nonzero(a > v))
    return TopK(float(v), torch.nonzero(a == v).squeeze(1)[:ties])


def abs_sample(x: torch.Tensor) -> torch.Tensor:
    """Sorted |x| (float32/64) at SAMPLE_SIZE random positions (seeded by numel: deterministic)."""
    flat, size = x.reshape(-1), SAMPLE_SIZE
    g = torch.Generator(device="cpu").manual_seed(flat.numel())
    idx = torch.randint(0, flat.numel(), (size,), generator=g).to(flat.device)
    s = flat[idx].abs()
    return (s if s.dtype in (torch.float32, torch.float64) else s.float()).sort().values


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest-magnitude entries of ``x`` (same shape), ties by lower flat index.

    Args:
        x: tensor of any shape.
        k: number of entries to keep, 0 ≤ k ≤ x.numel().
    Returns:
        bool tensor of ``x``'s shape with exactly k True entries.
    """
    flat = x.reshape(-1)
    if not flat.numel():
        return torch.zeros_like(x, dtype=torch.bool)

    def abs_chunk(start):
        a = flat[start:start + CHUNK].abs()
        return a if a.dtype in (torch.float32, torch.float64) else a.float()

    rule = select_topk(abs_chunk, flat.numel(), k, abs_sample(x) if flat.numel() >= SAMPLE_MIN_N else None)
    return torch.cat([rule.take(abs_chunk(a), a) for a in range(0, flat.numel(), CHUNK)]).view(x.shape)


def magnitude_prune(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``max(1, int(density·numel))`` magnitudes of ``x``, zero the rest (new tensor).

    Args:
        x: tensor of any shape.
        density: fraction kept, in (0, 1]; 1 returns ``x`` unchanged.
    Returns:
        tensor of ``x``'s shape and dtype.
    """
    if density >= 1:
        return x
    k = max(1, int(density * x.numel()))
    return x * topk_mask(x, k)


def outlier_prune(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``int(gamma·n)`` largest and enough smallest magnitudes to keep density.

    Counts as in mergekit's ``magnitude_outliers``: keep ``int(density·n)`` entries; the top
    ``int(gamma·n)`` are dropped, reduced if density + gamma > 1. Ties follow :func:`topk_mask`'s rule.

    Args:
        x: tensor of any shape.
        density: fraction kept, in (0, 1].
        gamma: fraction of largest magnitudes dropped, in [0, 1).
    Returns:
        tensor of ``x``'s shape and dtype.
    """
    if density >= 1:
        return x
    keep, n_top = outlier_counts(x.numel(), density, gamma)
    mask = topk_mask(x, keep + n_top)
    if n_top:
        mask &= ~topk_mask(x, n_top)
    return x * mask


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries kept, largest entries dropped) of :func:`outlier_prune` for n entries."""
    keep = max(1, int(density * n))
    return keep, min(int(gamma * n), n - keep)


def random_prune(x: torch.Tensor, density: float, generator: torch.Generator, rescale) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``, then rescale.

    Args:
        x: tensor of any shape.
        density: keep probability in (0, 1]; 1 returns ``x`` unchanged.
        generator: a CPU torch generator (seeded by the caller): the mask is drawn on the CPU so that a
            seed gives the same merge on every device.
        rescale: ``False`` (no rescale), ``True``/``"l1"`` (mergekit: scale so the L1 norm equals that
            of ``x``; unbiased only on average), or ``"density"`` (the DARE paper: multiply kept entries
            by 1/density, so E[result] = x exactly).
    Returns:
        tensor of ``x``'s shape and dtype.
    """
    if density >= 1:
        return x
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    keep = (torch.rand(work.shape, generator=generator, dtype=work.dtype) < density).to(work.device)
    return rescale_kept(work, work * keep, density, rescale).to(x.dtype)


def rescale_kept(work: torch.Tensor, out: torch.Tensor, p, rescale) -> torch.Tensor:
    """After a random drop with keep probability ``p`` (a number or a tensor like ``work``): ``rescale``
    ``"density"`` divides by ``p``; ``True`` / ``"l1"`` restores ``work``'s L1 norm (mergekit); else unchanged."""
    if rescale == "density":
        return out / p
    if rescale is True or rescale == "l1":
        before, after = work.abs().sum(), out.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            return out * (before / after)
    return out


# --- combination ------------------------------------------------------------------------------------


def combine(deltas: list[torch.Tensor], weights: list[float], *, consensus: bool, normalize: bool,
            lambda_: float = 1.0) -> torch.Tensor:
    """Weighted sum of (already pruned) deltas, optionally restricted to the elected sign (TIES).

    With ``consensus``: elected sign = sign of Σ_t w_t·τ_t (0 counts as +); an entry of task t takes part
    where sign(w_t·τ_t) equals it (zeros never do); ``normalize`` divides by Σ_t w_t over the
    participating tasks (1 where none). Without: Σ_t w_t·τ_t, ``normalize`` divides by Σ_t w_t (1 if
    |Σ w| < 1e-8). Then × λ. Same operations and order as mergekit's generalized task arithmetic.

    Args:
        deltas: T tensors of one shape (modified in place).
        weights: T floats.
    Returns:
        the merged delta, shape of ``deltas[0]``.
    """
    for d, w in zip(deltas, weights):
        if w != 1:
            d.mul_(w)
    if not consensus:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
        if normalize:
            total = float(sum(weights))
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    else:
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        # elected sign, +1 where the total is +0.0 (a −0.0 total means every τ is ±0: nothing agrees)
        sign = torch.ones_like(total).copysign_(total)
        del total
        mixed = None
        divisor = torch.zeros_like(deltas[0]) if normalize else None
        for d, w in zip(deltas, weights):
            agreeing = d.mul(sign).clamp_(min=0)  # |τ| where the signs agree, else 0 (τ = 0 never agrees)
            if normalize:
                divisor.add_(agreeing.sign(), alpha=w)
            mixed = agreeing if mixed is None else mixed.add_(agreeing)
        mixed.mul_(sign)  # exact: rounding is symmetric under negation
        if normalize:
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed


# --- methods ------------------------------------------------------------------------------------------


def linear(base, deltas, weights, *, normalize=True):
    """Model soup: Σ_t w_t·θ_t (/ Σ_t w_t with ``normalize``), returned as a delta from ``base``.

    Args:
        base: θ0, shape S. deltas: T tensors of shape S. weights: T floats.
    Returns:
        Δ of shape S with θ0 + Δ = Σ_t w_t θ_t / (Σ_t w_t if normalize else 1).
    """
    total = float(sum(weights))
    mixed = combine(deltas, weights, consensus=False, normalize=False)
    if normalize:
        return mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    if total != 1:
        mixed.add_(base, alpha=total - 1)
    return mixed


def task_arithmetic(base, deltas, weights, *, normalize=False, lambda_=1.0):
    """Task arithmetic: Δ = λ·Σ_t w_t·τ_t (divided by Σ_t w_t with ``normalize``).

    Args:
        base: θ0, shape S (unused). deltas: T tensors of shape S. weights: T floats.
    Returns:
        Δ, shape S.
    """
    return combine(deltas, weights, consensus=False, normalize=normalize, lambda_=lambda_)


def ties(base, deltas, weights, *, density, normalize=True, lambda_=1.0):
    """TIES: trim each τ_t to its top-k magnitudes, elect the sign by total mass, disjoint (weighted) mean.

    Args:
        base: θ0, shape S (unused). deltas: T tensors of shape S. weights: T floats.
        density: T floats in (0, 1], k = max(1, int(density·numel)).
    Returns:
        Δ, shape S.
    """
    pruned = [magnitude_prune(d, p) for d, p in zip(deltas, density)]
    return combine(pruned, weights, consensus=True, normalize=normalize, lambda_=lambda_)


def _dare(deltas, density, seed, rescale):
    out = []
    for t, (d, p) in enumerate(zip(deltas, density)):
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + t) % (1 << 63))
        out.append(random_prune(d, p, g, rescale))
    return out


def dare_linear(base, deltas, weights, *, density, rescale=True, normalize=False, lambda_=1.0, seed=0):
    """DARE + task arithmetic: random drop with keep rate ``density`` per task, rescale, weighted sum.

    Args:
        base: θ0, shape S (unused). deltas: T tensors of shape S. weights: T floats.
        density: T keep rates in (0, 1]. rescale: see :func:`random_prune`. seed: int (the engine
            derives one per tensor name, so results do not depend on tensor order).
    Returns:
        Δ, shape S.
    """
    return combine(_dare(deltas, density, seed, rescale), weights, consensus=False, normalize=normalize,
                   lambda_=lambda_)


def dare_ties(base, deltas, weights, *, density, rescale=True, normalize=False, lambda_=1.0, seed=0):
    """DARE + TIES sign election: random drop and rescale, then the disjoint merge of :func:`combine`.

    Args/Returns: as :func:`dare_linear`.
    """
    return combine(_dare(deltas, density, seed, rescale), weights, consensus=True, normalize=normalize,
                   lambda_=lambda_)


def breadcrumbs(base, deltas, weights, *, density, gamma, normalize=False, lambda_=1.0):
    """Model Breadcrumbs: drop the largest (``gamma``) and smallest magnitudes of each τ_t, weighted sum.

    Args:
        base: θ0, shape S (unused). deltas: T tensors of shape S. weights: T floats.
        density: T keep fractions in (0, 1]. gamma: T fractions of largest magnitudes dropped.
    Returns:
        Δ, shape S.
    """
    pruned = [outlier_prune(d, p, g) for d, p, g in zip(deltas, density, gamma)]
    return combine(pruned, weights, consensus=False, normalize=normalize, lambda_=lambda_)


def breadcrumbs_ties(base, deltas, weights, *, density, gamma, normalize=False, lambda_=1.0):
    """Breadcrumbs pruning followed by TIES sign election. Args/Returns: as :func:`breadcrumbs`."""
    pruned = [outlier_prune(d, p, g) for d, p, g in zip(deltas, density, gamma)]
    return combine(pruned, weights, consensus=True, normalize=normalize, lambda_=lambda_)


def _mean(deltas, weights):
    out = deltas[0] * weights[0]
    for d, w in zip(deltas[1:], weights[1:]):
        out.add_(d, alpha=w)
    return out.div_(len(deltas))


def tsv(base, deltas, weights, *, lambda_=1.0, sv_reduction=None):
    """Task Singular Vectors (TSV-Merge, Gargiulo et al. 2025).

    For a matrix: each w_t·τ_t = U_t S_t V_tᵀ keeps its top k = int(r·sv_reduction) singular triplets
    (r = min(m, n), sv_reduction = 1/T by default); the T blocks are concatenated into U (m × r), S, V
    (r × n) (unused slots are zero); U and V are replaced by their nearest orthogonal factors
    (U = P Qᵀ from U's SVD P Σ Qᵀ, same for V) and Δ = λ·U diag(S) Vᵀ. Any other tensor (vectors,
    scalars, >2-D) gets the mean λ·(1/T)·Σ_t w_t·τ_t.

    Args:
        base: θ0, shape S (unused). deltas: T tensors of shape S. weights: T floats.
    Returns:
        Δ, shape S.
    """
    T = len(deltas)
    if deltas[0].ndim != 2:
        return _mean(deltas, weights).mul_(lambda_)
    dtype = deltas[0].dtype
    m, n = deltas[0].shape
    r = min(m, n)
    k = int(r * (sv_reduction if sv_reduction is not None else 1.0 / T))
    if k == 0:
        return _mean(deltas, weights).mul_(lambda_)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    U = torch.zeros(m, r, dtype=work, device=deltas[0].device)
    S = torch.zeros(r, dtype=work, device=deltas[0].device)
    V = torch.zeros(r, n, dtype=work, device=deltas[0].device)
    for t, (d, w) in enumerate(zip(deltas, weights)):
        u, s, vh = torch.linalg.svd(d.to(work) * w, full_matrices=False)
        a, b = t * k, min((t + 1) * k, r)
        U[:, a:b], S[a:b], V[a:b] = u[:, : b - a], s[: b - a], vh[: b - a]
    pu, _, qu = torch.linalg.svd(U, full_matrices=False)
    pv, _, qv = torch.linalg.svd(V, full_matrices=False)
    out = torch.linalg.multi_dot([pu, qu, torch.diag(S), pv, qv])
    return out.mul_(lambda_).to(dtype)


def iso_c(base, deltas, weights, *, lambda_=1.0):
    """Isotropic merge (Iso-C, Marczak et al. 2025).

    For a matrix: M = Σ_t w_t·τ_t = U S Vᵀ, Δ = λ·mean(S)·U Vᵀ (all min(m, n) singular values flattened
    to their mean). Any other tensor: the mean λ·(1/T)·Σ_t w_t·τ_t (as the reference code).

    Args:
        base: θ0, shape S (unused). deltas: T tensors of shape S. weights: T floats.
    Returns:
        Δ, shape S.
    """
    if deltas[0].ndim != 2:
        return _mean(deltas, weights).mul_(lambda_)
    dtype = deltas[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    M = combine(deltas, weights, consensus=False, normalize=False).to(work)
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    return ((u * s.mean()) @ vh).mul_(lambda_).to(dtype)


# --- registry -------------------------------------------------------------------------------------


def _in_unit(v) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 else \
        "must be in (0, 1]"


def _in_half_open(v) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 else \
        "must be in [0, 1)"


def _number(v) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else \
        "must be a finite number"


def _boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _rescale(v) -> str | None:
    return None if isinstance(v, bool) or v in ("l1", "density") else 'must be true, false, "l1" or "density"'


def _integer(v) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) else "must be an integer"


def _fraction_or_none(v) -> str | None:
    return None if v is None else _in_unit(v)


@dataclass(frozen=True)
class Param:
    """A declared method parameter.

    ``per_model`` parameters (weight, density, gamma) may be set for each input model (and default at
    the top level); the others are global. ``check(value)`` returns an error text or None.
    """

    name: str
    default: Any
    check: Callable[[Any], str | None]
    per_model: bool = False
    doc: str = ""
    required: bool = False


WEIGHT = Param("weight", 1.0, _number, per_model=True, doc="coefficient w_t of the model")
DENSITY = Param("density", 1.0, _in_unit, per_model=True, doc="fraction of entries kept, in (0, 1]")
GAMMA = Param("gamma", 0.01, _in_half_open, per_model=True, doc="fraction of largest magnitudes dropped")
LAMBDA = Param("lambda", 1.0, _number, doc="scale λ of the merged delta")
INT8_MASK = Param("int8_mask", False, _boolean, doc="accepted for mergekit compatibility; no effect")
SEED = Param("seed", 0, _integer, doc="random seed (per tensor: derived from seed and the tensor name)")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, _boolean, doc="divide by the (participating) total weight")


def _rescale_param(default) -> Param:
    return Param("rescale", default, _rescale,
                 doc='after random drop: true/"l1" (mergekit: keep the L1 norm), "density" (×1/density), false')


@dataclass(frozen=True)
class Method:
    """A registered merge method: its function, declared parameters and whether it is random."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    doc: str
    mergekit: bool = True
    random: bool = False
    drops: bool = False  # may zero entries: NaN/Inf in an input could vanish, so inputs are checked one by one
    # Streaming form (used by the engine on CPU, chunk by chunk; equal to ``fn`` exactly): "elementwise"
    # (``fn`` itself applies to any slice), or a per-task pruning rule ("magnitude" top-k, "outliers"
    # of breadcrumbs) followed by :func:`combine` with ``consensus``, or "reduce": ``reduce = (stats, finish,
    # apply)`` — ``stats(base, deltas)`` a float64 vector additive over chunks, ``finish(total, **params)``
    # the tensor's coefficients, ``apply(base, deltas, coef)`` the chunk's Δ (equal to ``fn`` up to the order
    # of the float64 sums). None: whole tensors only. ``stream_if(params)``: whether these parameters stream.
    stream: str | None = None
    consensus: bool = False
    reduce: tuple[Callable, Callable, Callable] | None = None
    stream_if: Callable[[dict], bool] | None = None

    def streams(self, params: dict) -> bool:
        """Whether the engine may stream this method with these (evaluated, global) parameters."""
        return self.stream is not None and (self.stream_if is None or bool(self.stream_if(params)))

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def __call__(self, base, deltas, weights, **params):
        kw = {("lambda_" if k == "lambda" else k): v for k, v in params.items()
              if k not in ("weight", "int8_mask") and (k != "seed" or self.random)}
        return self.fn(base, deltas, weights, **kw)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to :data:`METHODS` (name must be new)."""
    if method.name in METHODS:
        raise MergeError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _m in [
    Method("linear", linear, (WEIGHT, _normalize(True)), "weighted average of the models (model soup)",
           stream="elementwise"),
    Method("task_arithmetic", task_arithmetic, (WEIGHT, _normalize(False), LAMBDA, INT8_MASK),
           "θ0 + λ·Σ w_t τ_t", stream="elementwise"),
    Method("ties", ties, (WEIGHT, DENSITY, _normalize(True), LAMBDA, INT8_MASK),
           "trim to density, elect sign by total mass, disjoint weighted mean", drops=True,
           stream="magnitude", consensus=True),
    Method("dare_linear", dare_linear, (WEIGHT, DENSITY, _rescale_param(True), _normalize(False), LAMBDA,
                                        INT8_MASK, SEED), "random drop + rescale, then task arithmetic",
           random=True, drops=True),
    Method("dare_ties", dare_ties, (WEIGHT, DENSITY, _rescale_param(True), _normalize(False), LAMBDA,
                                    INT8_MASK, SEED), "random drop + rescale, then TIES sign election",
           random=True, drops=True),
    Method("breadcrumbs", breadcrumbs, (WEIGHT, DENSITY, GAMMA, _normalize(False), LAMBDA, INT8_MASK),
           "drop largest (gamma) and smallest magnitudes, then task arithmetic", drops=True,
           stream="outliers"),
    Method("breadcrumbs_ties", breadcrumbs_ties, (WEIGHT, DENSITY, GAMMA, _normalize(False), LAMBDA, INT8_MASK),
           "breadcrumbs pruning, then TIES sign election", drops=True,
           stream="outliers", consensus=True),
    Method("tsv", tsv, (WEIGHT, LAMBDA, Param("sv_reduction", None, _fraction_or_none,
                                              doc="fraction of the rank kept per task (default 1/T)")),
           "task singular vectors: per-task truncated SVD, orthogonalised, rebuilt", mergekit=False),
    Method("iso_c", iso_c, (WEIGHT, LAMBDA), "isotropic merge: SVD of Σ w τ with flattened spectrum",
           mergekit=False),
]:
    register(_m)


def get_method(name: str) -> Method:
    """The registered method ``name``; :class:`MergeError` listing the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise MergeError(f"unknown merge method {name!r}; valid: {', '.join(METHODS)}") from None


from . import methods_extra  # noqa: F401  (registers slerp, nuslerp, ..., nearswap)
