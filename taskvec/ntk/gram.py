"""Gram products of Jacobian rows, accumulated in float64: tiles, triangle tiles of diagonal blocks, and the
CPU kernel they are written into (:class:`_Accumulator`).

float64 rows are multiplied in float64 in one product; float32 (and 16-bit, upcast to float32) rows in
float32 over column blocks of at most ``_P_BLOCK`` entries, each block's product added in float64: no
float64 copy of the rows is made, and the float32 round-off is that of a dot product of ``_P_BLOCK`` terms
(measured ~1e-7 relative). A symmetric kernel's diagonal blocks are computed as tiles ``i ≤ j`` of
:func:`_sym_tile` rows, the others mirrored, diagonal tiles symmetrised exactly.
"""

from __future__ import annotations

import torch

_P_BLOCK = 1 << 18  # columns per low-precision Gram product (each block's product is added in float64)


def _sym_tile(device) -> int:
    # rows per tile of a diagonal block: tiles i <= j only (a quarter fewer products at two tiles);
    # CPU, MiniLM qkv, n = 256: 128-row tiles measured as fast as one product, 64-row tiles 2.6x slower
    return 512 if torch.device(device).type == "cuda" else 128


def _kernel_shape(kind, n1, n2, o1, o2):
    return {"full": (n1, n2, o1, o2), "trace": (n1, n2), "diagonal": (n1, n2, o1)}[kind]


def _transpose_tile(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.permute(1, 0, 3, 2) if kind == "full" else t.transpose(0, 1)


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


def _add_triangle(tgt: torch.Tensor, J: torch.Tensor, a0: int, kind: str) -> None:
    """``tgt[a0:a0+m, a0:a0+m] +=`` the Gram of rows ``J (m, o, d)`` with themselves, from tiles ``i ≤ j``
    (:func:`_sym_tile` rows) mirrored, diagonal tiles symmetrised exactly."""
    m, T = J.shape[0], _sym_tile(J.device)
    for i in range(0, m, T):
        for j in range(i, m, T):
            si, sj = slice(a0 + i, a0 + min(m, i + T)), slice(a0 + j, a0 + min(m, j + T))
            t = _gram_tile(J[i:i + T], J[j:j + T], kind)
            if i == j:
                tgt[si, si] += 0.5 * (t + _transpose_tile(t, kind))
            else:
                tgt[si, sj] += t
                tgt[sj, si] += _transpose_tile(t, kind)


def _add_mirrored(tgt: torch.Tensor, JA: torch.Tensor, JB: torch.Tensor, a0: int, b0: int, kind: str) -> None:
    """``tgt[a, b] +=`` the Gram of ``JA`` (rows from ``a0``) and ``JB`` (rows from ``b0``), and ``tgt[b, a]``
    its transpose (an off-diagonal block of a symmetric kernel)."""
    a1, b1 = a0 + JA.shape[0], b0 + JB.shape[0]
    t = _gram_tile(JA, JB, kind)
    tgt[a0:a1, b0:b1] += t
    tgt[b0:b1, a0:a1] += _transpose_tile(t, kind)


class _Accumulator:
    """Float64 kernel (and group kernels) on the CPU, filled tile by tile from Jacobian chunks."""

    def __init__(self, groups, kind, n1, n2, o1, o2, want_groups, tile: int = 128):
        shape = _kernel_shape(kind, n1, n2, o1, o2)
        self.kind, self.tile = kind, max(1, int(tile))
        self.kernel = torch.zeros(shape, dtype=torch.float64)
        self.groups = {g: torch.zeros(shape, dtype=torch.float64) for g in groups} if want_groups else {}

    @classmethod
    def for_device(cls, groups, kind, n1, n2, o1, o2, want_groups, device) -> _Accumulator:
        """An accumulator whose diagonal-block tiles are :func:`_sym_tile` rows for ``device``."""
        return cls(groups, kind, n1, n2, o1, o2, want_groups, tile=_sym_tile(device))

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
