"""Sharding over ``torch.distributed`` ranks (``torchrun``): the process group, example shards, and the
distributed exact kernel (every rank returns the whole result)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modelfn import NTKError
from .engines import _Jacobian
from .gram import _Accumulator
from .schedules import _accumulator, _fill_rows, _fmt_bytes, _itemsize, _work_bytes


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


def _shard_chunk_size(jf1: _Jacobian, sh1, budget, o1, o2, world: int) -> int:
    """The largest chunk (halving ``jf1.chunk_size``) for which a rank's stored shard, a received chunk and
    the work of a computed chunk fit ``budget``; raises when even one example does not."""
    itemsize = _itemsize(jf1)
    per_ex1 = o1 * jf1.p * itemsize
    m = max(len(s) for s in sh1)

    def need_bytes(c):  # stored shard + a received chunk + the work of a computed chunk
        return m * per_ex1 + c * o2 * jf1.p * itemsize + _work_bytes(jf1, c, o1, o2)

    chunk = jf1.chunk_size
    while chunk > 1 and need_bytes(chunk) > budget:
        chunk //= 2
    if need_bytes(chunk) > budget:
        raise NTKError(
            f"distributed exact kernel does not fit: each of the {world} ranks keeps the Jacobians of its "
            f"{m} examples ({_fmt_bytes(m * per_ex1)}, o × p × {itemsize} B each, p = {jf1.p:,}) and needs "
            f"{_fmt_bytes(need_bytes(chunk))} in all > budget {_fmt_bytes(budget)}. Use more ranks, a larger "
            "max_memory, fewer parameters or mode='sketch'.")
    return chunk


def _exact_distributed(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric, kind, want_groups, budget, o1, o2,
                       d: _Dist):
    """Exact kernel over ``d.world`` ranks; every rank returns the whole kernel.

    Each rank computes and keeps the Jacobians of its shard of ``inputs1`` (``_shards``). Symmetric: rank
    ``r`` computes its diagonal block and the blocks ``(r, s)`` with ``0 < (s − r) mod W < W/2`` (at
    ``W/2`` exactly: every other chunk of ``s``), from chunks of shard ``s`` broadcast by rank ``s`` out of
    its stored rows: every block once, balanced, each gradient computed once. Cross kernel: rank ``s``
    computes its shard of ``inputs2`` chunk by chunk and broadcasts it; every rank multiplies it by its
    stored rows. Finally the float64 kernels are summed over the ranks (all-reduce).
    """
    acc = _accumulator(jf1, b1, b2, symmetric, kind, want_groups, o1, o2)
    W, r = d.world, d.rank
    sh1 = _shards(b1, W)
    sh2 = sh1 if symmetric else _shards(b2, W)
    chunk = _shard_chunk_size(jf1, sh1, budget, o1, o2, W)
    jf1.chunk_size = jf2.chunk_size = chunk
    mine = sh1[r]
    R, passes = _fill_rows(jf1, b1, mine.to(b1["input_ids"].device), o1, "inputs1")
    if symmetric:
        acc.add(R, R, mine, mine, mirror=False)
    for s in range(W):
        passes += _multiply_shard(jf1, jf2, b2, symmetric, acc, R, mine, sh1 if symmetric else sh2, s, chunk,
                                  o1 if symmetric else o2, d)
    del R
    d.all_reduce_(acc.kernel)
    for g in acc.groups:
        d.all_reduce_(acc.groups[g])
    n_all = b1["input_ids"].shape[0] + (0 if symmetric else b2["input_ids"].shape[0])
    per_ex1 = o1 * jf1.p * _itemsize(jf1)
    return acc, {"gradient_passes": passes, "row_block": max(len(x) for x in sh1), "memory_budget": budget,
                 "world_size": W, "rank": r, "full_jacobian_bytes": n_all * per_ex1, "engine": jf1.engine}


def _multiply_shard(jf1: _Jacobian, jf2: _Jacobian, b2, symmetric, acc: _Accumulator, R: dict,
                    mine: torch.Tensor, shards, s: int, chunk: int, oB: int, d: _Dist) -> int:
    """This rank's share of the blocks (own rows ``R``) × (shard ``s``), chunk by chunk, each chunk broadcast
    by rank ``s`` (symmetric: out of its stored rows; cross: computed). Returns the gradient passes made."""
    W, r = d.world, d.rank
    jB = jf1 if symmetric else jf2

    def share(rank, k):
        return _computes(rank, s, k, W) if symmetric else "all"

    if symmetric:
        chunks = [(shards[s][a:a + chunk], None) for a in range(0, len(shards[s]), chunk)]
    else:
        chunks = [(shards[s][pos], pos) for pos in jf2.plan(b2, shards[s])]
    odd = torch.cat([torch.arange(a, min(a + chunk, len(mine)))
                     for a in range(chunk, len(mine), 2 * chunk)] or [torch.zeros(0, dtype=torch.long)])
    R_odd = None  # own rows in odd-numbered chunks (for a pair split at W/2), made when first needed
    passes = 0
    for k, (rows, pos) in enumerate(chunks):
        if not any(share(q, k) for q in range(W)):
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
        how = share(r, k)
        if how is not None:
            JB = _unpack(flat.to(jf1.device), jB.groups, jB.group_sizes, oB)
            if how == "all":
                acc.add(R, JB, mine, rows, mirror=symmetric)
            elif len(odd):
                if R_odd is None:
                    R_odd = {g: R[g][odd.to(jf1.device)] for g in jf1.groups}
                acc.add(R_odd, JB, mine[odd], rows, mirror=True)
        del flat
    return passes
