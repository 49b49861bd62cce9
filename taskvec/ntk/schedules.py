"""Exact-mode schedules (single process): what is kept between the gradient passes and the Gram, within a
memory budget.

:class:`Schedule` documents the choice (``empirical_ntk(..., schedule=)``); :func:`parse_bytes` and
:func:`default_memory_budget` give the budget (``max_memory=``). The sharded schedule over
``torch.distributed`` ranks is :func:`taskvec.ntk.distributed._exact_distributed`.
"""

from __future__ import annotations

import math
from enum import Enum
from types import SimpleNamespace

import torch

from ..modelfn import NTKError
from .engines import Engine, _check_finite, _Jacobian
from .gram import _Accumulator, _add_mirrored, _add_triangle, _gram_into, _kernel_shape


class Schedule(str, Enum):
    """What exact mode stores between the gradient passes and the Gram (``info["schedule"]`` says which ran).

    ``AUTO`` (``"auto"``, default)
        ``ACTIVATIONS`` when the batched engine applies and the stored activations need fewer bytes than
        the whole Jacobian and fit the budget, else ``JACOBIAN``.
    ``ACTIVATIONS`` (``"activations"``)
        each selected layer's inputs and output gradients from one gradient pass per example (per token
        ``d_in`` — once per distinct input: Q, K and V share theirs — ``+ o·Σ d_out`` numbers, instead of
        the Jacobian's ``o·Σ d_in·d_out`` per example); each parameter group's Jacobian rows are formed from
        them (``Σ_t g xᵀ``, about ``L`` Gram entries of work per example) when that group is multiplied.
        Every gradient computed once; small for short sequences; needs the batched engine. Forced, it
        raises when it does not fit.
    ``JACOBIAN`` (``"jacobian"``)
        the Jacobian rows (``o·p`` numbers per example), any engine. When they do not fit the budget they
        are processed in row blocks and the column chunks recomputed, so memory stays bounded (time grows
        by about ``n / (2·block)`` extra gradient passes).
    """

    AUTO = "auto"
    ACTIVATIONS = "activations"
    JACOBIAN = "jacobian"


# --- memory budget -------------------------------------------------------------------------------------------


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


def _itemsize(jf: _Jacobian) -> int:
    return torch.finfo(jf.dtype).bits // 8


def _work_bytes(jf: _Jacobian, c: int, o1: int, o2: int) -> int:
    """One streamed chunk of ``c`` examples, and its per-parameter copy before the groups are concatenated."""
    return 2 * c * max(o1, o2) * jf.p * _itemsize(jf)


def _accumulator(jf1: _Jacobian, b1, b2, symmetric, kind, want_groups, o1, o2) -> _Accumulator:
    n1 = b1["input_ids"].shape[0]
    n2 = n1 if symmetric else b2["input_ids"].shape[0]
    return _Accumulator.for_device(jf1.groups, kind, n1, n2, o1, o2, want_groups, jf1.device)


def _tokens(batch: dict, idx: torch.Tensor) -> int:
    """Examples × trimmed length of one chunk (what a capture of it stores per token)."""
    m = batch["attention_mask"][idx.to(batch["attention_mask"].device)]
    used = m.bool().any(0).nonzero()
    return len(idx) * (int(used.max()) + 1 if used.numel() else 1)


# --- single process: choose a schedule ------------------------------------------------------------------------


def _exact_single(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric, kind, want_groups, budget, o1, o2,
                  schedule: str = "auto"):
    """Exact kernel in one process: ``(accumulator-like with .kernel and .groups, info)``."""
    n1 = b1["input_ids"].shape[0]
    n2 = n1 if symmetric else b2["input_ids"].shape[0]
    itemsize = _itemsize(jf1)
    per_ex1 = o1 * jf1.p * itemsize
    chunk = jf1.chunk_size
    # many outputs (o) make a default chunk too large for the budget: halve it until a block fits
    while chunk > 1 and int((budget - _work_bytes(jf1, chunk, o1, o2)) // per_ex1) < chunk:
        chunk //= 2
    jf1.chunk_size = jf2.chunk_size = chunk
    work = _work_bytes(jf1, chunk, o1, o2)
    rows = int((budget - work) // per_ex1)
    full_bytes = (n1 if symmetric else n1 + n2) * per_ex1
    if schedule != Schedule.JACOBIAN and jf1.engine == Engine.BATCHED and jf2.engine == Engine.BATCHED:
        # stored activations are smaller than Jacobian rows for short sequences: one pass, no recomputation
        res = _exact_activations(jf1, jf2, b1, b2, symmetric, kind, want_groups, budget, o1, o2, full_bytes,
                                 force=schedule == Schedule.ACTIVATIONS)
        if res is not None:
            return res
    if schedule == Schedule.ACTIVATIONS:  # forced, it raises itself when it does not fit: the engine does not apply
        raise NTKError("schedule='activations' needs the batched engine (every selected tensor a weight or bias "
                       f"of a linear layer used once); here: {jf1.fallback_reason or 'not applicable'}")
    if rows < chunk:
        raise NTKError(
            f"exact kernel does not fit: the whole Jacobian needs {_fmt_bytes(full_bytes)} "
            f"({'n' if symmetric else 'n1+n2'} × o × p × {itemsize} B, p = {jf1.p:,}), and even one row block of "
            f"{chunk} examples plus a streamed chunk needs {_fmt_bytes(chunk * per_ex1 + work)} > budget "
            f"{_fmt_bytes(budget)}. Use mode='sketch' (features n × k), a smaller chunk_size, fewer parameters, "
            "or a larger max_memory.")
    acc = _accumulator(jf1, b1, b2, symmetric, kind, want_groups, o1, o2)
    return _exact_jacobian(jf1, jf2, b1, b2, symmetric, acc, min(rows, n1), o1, budget, full_bytes)


# --- the Jacobian schedule: row blocks, column chunks recomputed ------------------------------------------------


def _fill_rows(jf: _Jacobian, batch, idx: torch.Tensor, o: int, name: str) -> tuple[dict, int]:
    """Stored Jacobians of the examples ``idx`` of ``batch``, in order: ``(group -> (R, o, p_g), passes)``."""
    buf = {g: torch.empty((len(idx), o, jf.group_sizes[g]), dtype=jf.dtype, device=jf.device) for g in jf.groups}
    passes = 0
    for pos, J in jf.blocks(batch, idx, name):
        passes += len(pos)
        for g in J:
            buf[g][pos.to(jf.device)] = J[g]
    return buf, passes


def _exact_jacobian(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric, acc: _Accumulator, rows: int, o1: int,
                    budget: int, full_bytes: int):
    """Blocks of ``rows`` stored rows of inputs1, each multiplied by itself (triangle tiles) and by every later
    chunk (symmetric: recomputed) or every chunk of inputs2 (cross)."""
    n1 = b1["input_ids"].shape[0]
    idx1 = torch.arange(n1, device=b1["input_ids"].device)
    passes = 0
    for start in range(0, n1, rows):
        stop = min(n1, start + rows)
        R, p = _fill_rows(jf1, b1, idx1[start:stop], o1, "inputs1")
        passes += p
        ia = torch.arange(start, stop)
        if symmetric:
            acc.add(R, R, ia, ia, mirror=False)
            rest = idx1[stop:]
            for pos, J in jf1.blocks(b1, rest, "inputs1"):
                passes += len(pos)
                acc.add(R, J, ia, rest[pos.to(rest.device)].cpu(), mirror=True)
        else:
            idx2 = torch.arange(b2["input_ids"].shape[0], device=b2["input_ids"].device)
            for pos, J in jf2.blocks(b2, idx2, "inputs2"):
                passes += len(pos)
                acc.add(R, J, ia, pos.cpu(), mirror=False)
        del R
    return acc, {"schedule": "jacobian", "gradient_passes": passes, "row_block": rows, "memory_budget": budget,
                 "full_jacobian_bytes": full_bytes, "engine": jf1.engine}


# --- the activations schedule: one pass, group by group ----------------------------------------------------------


def _activation_rows(jf1: _Jacobian, b1, plans, first, rows0, kind, want_groups, budget, o1, o2, n1, n2,
                     full_bytes: int, force: bool):
    """``(R, capture bytes)``: rows per formed block, from the first chunk's capture; None when the schedule
    does not fit ``budget`` (raises instead with ``force``) or, unforced, stores no fewer bytes than the
    Jacobian."""
    itemsize = _itemsize(jf1)
    per_token = jf1.capture_bytes(first) / _tokens(b1, rows0)
    tokens = sum(_tokens(b, idx[pos.to(idx.device)]) for _, b, idx, plan in plans for pos in plan)
    cap_bytes = per_token * tokens * max(o1, o2) / o1
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
    symmetric = len(plans) == 1
    R = n1 if symmetric and free >= n1 * per_row else max(jf1.chunk_size, int(free // (2 * per_row)))
    return R, cap_bytes


def _capture_all(plans, first) -> list | None:
    """Per side: ``[(positions in the input (CPU), capture)]`` in plan order (the first chunk's capture is
    ``first``); None if a capture fails."""
    caps = []
    for side, (jf, b, idx, plan) in enumerate(plans):
        got = []
        for c, pos in enumerate(plan):
            rows = idx[pos.to(idx.device)]
            cap = first if side == 0 and c == 0 else jf.capture_chunk(b, rows)
            if cap is None:  # cannot happen after the first chunk's check, but never trust it silently
                return None
            got.append((rows.cpu(), cap))
        caps.append(got)
    return caps


def _row_blocks(got, R: int) -> list:
    """Consecutive captures grouped into blocks of at most ``R`` rows (a chunk is never split):
    ``[(first row, [(rows, capture), ...])]``."""
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


def _form_rows(jf: _Jacobian, blk, g: str, name: str) -> torch.Tensor:
    """Jacobian rows of group ``g`` for a block of captures, checked finite."""
    J = torch.cat([jf.form_group(cap, g) for _, cap in blk], 0)
    _check_finite(J, torch.cat([r for r, _ in blk]), name, g)
    return J


def _group_gram(tgt, jf1, jf2, B1, B2, g: str, symmetric: bool, kind: str) -> None:
    """``tgt +=`` group ``g``'s kernel in capture order: each row block of inputs1 formed once, times itself
    (triangle tiles) and the later blocks (symmetric, mirrored) or every block of inputs2 (cross)."""
    for bi, (a0, blk) in enumerate(B1):
        JA = _form_rows(jf1, blk, g, "inputs1")
        a1 = a0 + JA.shape[0]
        if symmetric:
            _add_triangle(tgt, JA, a0, kind)
            later = B1[bi + 1:]
        else:
            later = B2
        for b0, blk2 in later:
            if symmetric:
                _add_mirrored(tgt, JA, _form_rows(jf1, blk2, g, "inputs1"), a0, b0, kind)
            else:
                JB = _form_rows(jf2, blk2, g, "inputs2")
                _gram_into(tgt[a0:a1, b0:b0 + JB.shape[0]], JA, JB, kind)
                del JB
        del JA


def _exact_activations(jf1: _Jacobian, jf2: _Jacobian, b1, b2, symmetric, kind, want_groups, budget, o1, o2,
                       full_bytes: int, force: bool = False):
    """Exact kernel from stored layer activations, group by group — or None when it does not fit ``budget``.

    One batched forward + backward per chunk (every example's gradient pass exactly once) keeps, per
    selected layer, its inputs ``x (b, L, d_in)`` and the output gradients ``g (b, o, L, d_out)`` (see
    :class:`Schedule`; ``force`` takes this path whenever it fits and raises otherwise). Then for each
    parameter group its Jacobian rows are formed from them for a block of rows at a time and multiplied into
    a float64 device kernel (triangle tiles on diagonal blocks). The group Grams add up to the kernel in the
    order of the capture; it is put back in the input order once.
    """
    idx1 = torch.arange(b1["input_ids"].shape[0], device=b1["input_ids"].device)
    idx2 = None if symmetric else torch.arange(b2["input_ids"].shape[0], device=b2["input_ids"].device)
    plans = [(jf1, b1, idx1, jf1.plan(b1, idx1))] + ([] if symmetric else [(jf2, b2, idx2, jf2.plan(b2, idx2))])
    rows0 = idx1[plans[0][3][0].to(idx1.device)]
    first = jf1.capture_chunk(b1, rows0)
    if first is None:
        return None
    n1 = len(idx1)
    n2 = n1 if symmetric else len(idx2)
    sized = _activation_rows(jf1, b1, plans, first, rows0, kind, want_groups, budget, o1, o2, n1, n2,
                             full_bytes, force)
    if sized is None:
        return None
    R, cap_bytes = sized
    caps = _capture_all(plans, first)
    del first
    if caps is None:
        return None
    if symmetric:
        caps.append(caps[0])
    B1, B2 = _row_blocks(caps[0], R), _row_blocks(caps[1], R)
    shape = _kernel_shape(kind, n1, n2, o1, o2)
    Kd = torch.zeros(shape, dtype=torch.float64, device=jf1.device)
    Gd = torch.zeros_like(Kd) if want_groups else None
    perm1 = torch.cat([r for r, _ in caps[0]])
    perm2 = torch.cat([r for r, _ in caps[1]])

    def unpermute(t):
        out = torch.empty(shape, dtype=torch.float64)
        out[perm1[:, None], perm2[None, :]] = t.cpu()
        return out

    groups_out = {}
    for g in jf1.groups:
        _group_gram(Gd.zero_() if want_groups else Kd, jf1, jf2, B1, B2, g, symmetric, kind)
        if want_groups:
            Kd += Gd
            groups_out[g] = unpermute(Gd)
    passes = n1 + (0 if symmetric else n2)
    info = {"schedule": "activations", "gradient_passes": passes, "activation_bytes": int(cap_bytes),
            "row_block": min(R, n1), "memory_budget": budget, "full_jacobian_bytes": full_bytes,
            "engine": jf1.engine}
    return SimpleNamespace(kernel=unpermute(Kd), groups=groups_out), info
