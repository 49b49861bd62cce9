"""Jacobian features and their random sketch: ``φ(x) = J(x) S / √k`` with a seeded blockwise projection
``S`` that is never materialised (:class:`Projector`), :class:`Features` and :func:`jacobian_features`, and
the sketched kernel of ``empirical_ntk(mode="sketch")``."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..modelfn import NTKError, _model_device, as_batch, eval_mode, tf32_disabled
from ..scopes import ParamSelection
from .distributed import _Dist, _dist_context, _shards
from .engines import _default_chunk, _Jacobian
from .gram import _gram_tile
from .selection import _params_label, select_params

PROJECTIONS = ("rademacher", "gaussian")


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

    def kernel(self, other: Features | None = None, kind: str = "full") -> torch.Tensor:
        """float64 kernel ``<φ_i, φ'_j>`` in the layout of ``kind``."""
        B = self.features if other is None else other.features
        return _gram_tile(self.features, B, kind)


def _exact_features(jf: _Jacobian, batch, rows_dev, o: int, d: _Dist | None, shards, feature_dtype):
    """``(n, o, p)`` Jacobian rows on the CPU (this rank's rows, all-gathered) and group -> column slice."""
    fdt = feature_dtype or torch.float64
    F = torch.empty((len(rows_dev), o, jf.p), dtype=fdt)
    for pos, J in jf.blocks(batch, rows_dev, "inputs"):
        F[pos] = torch.cat([J[g] for g in jf.groups], -1).to("cpu", fdt)
    if d is not None:
        F = d.gather_rows(F, shards, batch["input_ids"].shape[0])
    slices, a = {}, 0
    for g in jf.groups:
        slices[g] = slice(a, a + jf.group_sizes[g])
        a += jf.group_sizes[g]
    return F, slices


def _sketched_features(jf: _Jacobian, proj: Projector, batch, rows_dev, o: int, d: _Dist | None, shards,
                       per_group: bool, feature_dtype, project_batch: int | None):
    """``(n, o, k)`` sketched rows on the CPU (and group -> ``(n, o, k)`` with ``per_group``), projected in
    batches of ``project_batch`` examples: each pass regenerates ``S`` (``p·k`` random numbers)."""
    m = len(rows_dev)
    fdt = feature_dtype or torch.float32
    F = torch.empty((m, o, proj.k), dtype=fdt)
    G = {g: torch.empty((m, o, proj.k), dtype=fdt) for g in jf.groups} if per_group else {}
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
        n = batch["input_ids"].shape[0]
        F = d.gather_rows(F, shards, n)
        G = {g: d.gather_rows(v, shards, n) for g, v in G.items()}
    return F, G


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
    rows_dev = rows.to(dev)
    label = _params_label(params)
    with tf32_disabled(), eval_mode(model), torch.no_grad():
        o = jf.num_outputs(batch)
        if mode == "exact":
            F, slices = _exact_features(jf, batch, rows_dev, o, d, shards, feature_dtype)
            return Features(F, slices, mode, output, label, jf.p, dict(jf.group_sizes))
        proj = Projector(sels, sketch_dim, seed, projection, block_rows)
        F, G = _sketched_features(jf, proj, batch, rows_dev, o, d, shards, per_group, feature_dtype,
                                  project_batch)
        return Features(F, G, mode, output, label, jf.p, dict(jf.group_sizes), proj.k, seed, projection)


# --- the sketched kernel (empirical_ntk(mode="sketch")) ---------------------------------------------------------


def _sketch_side(jf: _Jacobian, proj: Projector, b, name: str, o: int, want_groups: bool, d: _Dist | None):
    """float64 sketched features ``(n, o, k)`` on the model's device (and group -> the same with
    ``want_groups``), this rank's shard computed and all-gathered."""
    n = b["input_ids"].shape[0]
    shards = _shards(b, d.world) if d is not None else None
    rows = (shards[d.rank] if d is not None else torch.arange(n)).to(b["input_ids"].device)
    F = torch.empty((len(rows), o, proj.k), dtype=torch.float64, device=jf.device)
    Gs = {g: torch.empty_like(F) for g in jf.groups} if want_groups else {}
    for pos, J in jf.blocks(b, rows, name):
        tot, grp = proj.project(J, want_groups)
        F[pos.to(F.device)] = tot.double()
        for g, v in grp.items():
            Gs[g][pos.to(F.device)] = v.double()
    if d is not None:
        F = d.gather_rows(F, shards, n)
        Gs = {g: d.gather_rows(v, shards, n) for g, v in Gs.items()}
    return F, Gs


def _sketch_kernel(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric: bool, kind: str, want_groups: bool,
                   o1: int, o2: int, proj: Projector, d: _Dist | None):
    """``(K, groups, info)`` of the sketched kernel ``<φ1_i, φ2_j>`` (float64, CPU)."""
    F1, G1 = _sketch_side(jf1, proj, b1, "inputs1", o1, want_groups, d)
    F2, G2 = (F1, G1) if symmetric else _sketch_side(jf2, proj, b2, "inputs2", o2, want_groups, d)
    K = _gram_tile(F1, F2, kind).cpu()
    G = {g: _gram_tile(G1[g], G2[g], kind).cpu() for g in G1}
    info = {"features_bytes": F1.numel() * 8 * (1 + len(G1)), "engine": jf1.engine}
    if d is not None:
        info.update({"world_size": d.world, "rank": d.rank})
    return K, G, info
