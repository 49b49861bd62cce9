"""Phase 1: each task's eNTK at θ0 on its kernel inputs, its top-r eigenspace mapped to parameter space,
the overlaps and energies they explain, and the NTK-aware merge directions."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..interference import (
    Eigenspace,
    _flat_kernel,
    basis_coefficients,
    basis_overlap,
    eigenspace_basis,
    loss_raising_coefficients,
    subspace_overlap,
    top_eigenspace,
)
from ..linearize import forward_outputs
from .context import Context, kernel_scope


@dataclass
class EigenPhase:
    """Result of :func:`eigenspace_phase`.

    ``info`` (JSON, ``results["eigen"]``): ``rank``, ``n_kernel``, ``p`` (parameters in the scope),
    ``random_baseline`` (= r/p), ``overlap`` (T × T, ‖V_Aᵀ V_B‖_F² / r), ``split_half`` (same-task ceiling),
    ``energy`` (T × T: share of ‖τ_t‖² in task s's top-r eigenspace, row s, column t), ``spectra`` (top 200
    eigenvalues per task) and, with the NTK-aware merges, the share of ‖τ_t‖ each removes.
    ``directions`` (in memory): ``ntk_sum`` and ``ntk_harm_sum``, the summed NTK-aware task vectors.
    """

    info: dict = field(default_factory=dict)
    directions: dict = field(default_factory=dict)
    seconds: float = 0.0
    bases_seconds: float = 0.0


def _split_half(K: torch.Tensor, n: int, rank: int) -> float:
    """Overlap of the top eigenspaces of the two halves of one task's kernel inputs (the ceiling that two
    samples of the same task reach)."""
    o = K.shape[0] // n
    h = (n // 2) * o
    r_half = min(rank, h // 2)
    A, B = top_eigenspace(K[:h, :h], r_half), top_eigenspace(K[h:2 * h, h:2 * h], r_half)
    return subspace_overlap(A, B, K[:h, h:2 * h])["overlap"]


def _bases(ctx: Context, rank: int, progress: bool):
    from tqdm.auto import tqdm

    from ..ntk import as_batch, empirical_ntk

    scope = kernel_scope(ctx.run, ctx.keys)
    Ks, spaces, bases = {}, {}, {}
    for t in tqdm(ctx.names, desc="eNTK eigenspaces", disable=not progress):
        kin = as_batch(list(ctx.kernel_batches[t]), ctx.device)
        Ks[t] = _flat_kernel(empirical_ntk(ctx.models[t], kin, params=scope, kernel="full", groups=False))
        spaces[t] = top_eigenspace(Ks[t], rank)
        bases[t] = eigenspace_basis(ctx.models[t], ctx.kernel_batches[t], spaces[t], ctx.keys, device=ctx.device)
        if ctx.ledger is not None:  # per-example gradients of every output row, then 1 forward + r VJPs
            n, rows = len(ctx.kernel_batches[t].indices), Ks[t].shape[0]
            ctx.ledger.add("reverse", rows)
            ctx.ledger.add("forward", n)
            ctx.ledger.add("reverse", n, spaces[t].U.shape[1])
    return Ks, spaces, bases


def _ntk_aware_directions(ctx: Context, spaces: dict[str, Eigenspace], bases: dict, coef: dict) -> tuple:
    """τ_t' = τ_t − Σ_{s≠t} V_s V_sᵀ τ_t (``ntk_aware``) and τ_t'' that removes only the components that
    raise task s's training loss to first order (``ntk_aware_harmful``), per task."""
    names = ctx.names
    # which of task s's eigendirections lower its training loss: g_s = Uᵀ r_s, r_s = onehot(y) − softmax(f0)
    # on the kernel inputs; moving by c·V_j changes the loss by ≈ −σ_j·g_j·c / n (first order)
    helps = {}
    for s in names:
        f0k, yk = forward_outputs(ctx.models[s], ctx.kernel_batches[s], ctx.device)
        if ctx.ledger is not None:
            ctx.ledger.add("forward", len(yk))
        r = (torch.nn.functional.one_hot(yk, f0k.shape[-1]).double() - f0k.double().softmax(-1)).reshape(-1)
        helps[s] = spaces[s].U.T @ r  # (r,)
    proj, harm = {}, {}
    for t in names:
        delta = {k: v.float().clone() for k, v in ctx.vectors[t].deltas.items()}
        delta_h = {k: v.float().clone() for k, v in ctx.vectors[t].deltas.items()}
        for s in names:
            if s == t:
                continue
            c = coef[(s, t)]
            ch = loss_raising_coefficients(c, helps[s])
            for k in delta:
                if k in bases[s]:
                    Vk = bases[s][k]
                    delta[k] -= torch.einsum("r,r...->...", c.float().to(Vk.device), Vk).cpu()
                    delta_h[k] -= torch.einsum("r,r...->...", ch.float().to(Vk.device), Vk).cpu()
        proj[t], harm[t] = delta, delta_h
    return proj, harm


def eigenspace_phase(ctx: Context, rank: int, n_kernel: int, ntk_aware: bool = True,
                     progress: bool = True) -> EigenPhase:
    """Kernels, top-r eigenspaces and parameter-space bases of every task, then overlaps, split-half
    ceilings, energies and (``ntk_aware``) the NTK-aware directions. ``rank = 0`` without ``ntk_aware``
    skips the phase."""
    tick = time.time()
    if not (ntk_aware or rank > 0):
        return EigenPhase(seconds=time.time() - tick)
    names, T = ctx.names, len(ctx.names)
    Ks, spaces, bases = _bases(ctx, rank, progress)
    bases_seconds = time.time() - tick
    p_total = sum(ctx.base_state[k].numel() for k in ctx.keys)
    overlap = np.eye(T)
    for i, a in enumerate(names):
        for j in range(i + 1, T):
            overlap[i, j] = overlap[j, i] = basis_overlap(bases[a], bases[names[j]])["overlap"]
    split_half = {t: _split_half(Ks[t], len(ctx.kernel_batches[t].indices), rank) for t in names}
    energy = np.zeros((T, T))
    coef = {}
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            coef[(s, t)] = c = basis_coefficients(bases[s], ctx.vectors[t].deltas)
            nt = ctx.vectors[t].norm()
            energy[i, j] = float((c ** 2).sum()) / nt ** 2 if nt > 0 else float("nan")
    info = {"rank": rank, "n_kernel": n_kernel, "p": p_total, "random_baseline": rank / p_total,
            "overlap": overlap.tolist(), "split_half": split_half,
            "energy": [[None if math.isnan(x) else x for x in row] for row in energy.tolist()],
            "spectra": {t: spaces[t].eigenvalues[:200].tolist() for t in names}}
    directions = {}
    if ntk_aware:
        proj, harm = _ntk_aware_directions(ctx, spaces, bases, coef)
        directions["ntk_sum"] = {k: sum(proj[t][k] for t in names if k in proj[t]) for k in ctx.keys}
        directions["ntk_harm_sum"] = {k: sum(harm[t][k] for t in names if k in harm[t]) for k in ctx.keys}

        def removed(d: dict, t: str):
            nt = ctx.vectors[t].norm()
            return 1 - math.sqrt(sum(float((d[k] ** 2).sum()) for k in d)) / nt if nt > 0 else None

        info["ntk_aware_removed_share"] = {t: removed(proj[t], t) for t in names}
        info["ntk_aware_harmful_removed_share"] = {t: removed(harm[t], t) for t in names}
    return EigenPhase(info, directions, time.time() - tick, bases_seconds)
