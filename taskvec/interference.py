"""The interference math: eigenspaces of task kernels and their overlaps, where a task vector lives in
them, the loss-raising components, and the trust band of a linearised prediction.

* :func:`top_eigenspace` / :func:`subspace_overlap`: top-r eigenpairs of a task's multi-output eNTK and the
  overlap ``‖V_Aᵀ V_B‖_F² / r`` of two tasks' parameter-space eigenspaces from a cross kernel;
* :func:`eigenspace_basis`: the eigenspace mapped to parameter space once, V = Jᵀ U Σ⁻¹ (r reverse
  passes), after which overlaps (:func:`basis_overlap`), energies and projections
  (:func:`basis_coefficients`, :func:`eigenspace_component`) are inner products;
* :func:`loss_raising_coefficients`: the eigen-components of a direction that raise a task's training
  loss to first order (the ``ntk_aware_harmful`` merge);
* :func:`trust_band`: a prediction's own error estimate, known before merging.

The validation that uses them (predict, measure, choose coefficients) is :mod:`taskvec.validation`.
Definitions: ``../shared/THEORY.md`` ("Linearised predictions", "Eigenspaces and overlaps").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linearize import vjp_params_many


def __getattr__(name):  # the validation moved to taskvec.validation, MergeSpec to taskvec.merge.memory
    if name in ("validate_run", "DEFAULT_MERGES", "DEFAULT_LAMBDAS"):
        from . import validation

        return getattr(validation, name)
    if name in ("MergeSpec", "merge_vectors"):
        from .merge import memory

        return getattr(memory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- eigenspaces ------------------------------------------------------------------------------------------


@dataclass
class Eigenspace:
    """Top-r eigenpairs of one task's multi-output kernel K (n·o × n·o, unnormalised), on its kernel inputs."""

    U: torch.Tensor  # (n·o, r) float64
    S2: torch.Tensor  # (r,) eigenvalues = squared singular values of J
    eigenvalues: torch.Tensor  # all eigenvalues, descending (float64)


def top_eigenspace(K: torch.Tensor, r: int) -> Eigenspace:
    """Symmetrise, ``eigh`` in float64, keep the top-r positive eigenpairs."""
    K = K.double()
    K = 0.5 * (K + K.T)
    w, V = torch.linalg.eigh(K)
    w, V = w.flip(0), V.flip(1)
    keep = int(min(r, int((w > w[0] * 1e-10).sum())))
    return Eigenspace(V[:, :keep], w[:keep], w)


def subspace_overlap(A: Eigenspace, B: Eigenspace, K_AB: torch.Tensor) -> dict:
    """Overlap of the parameter-space eigenspaces V_A = J_Aᵀ U_A Σ_A⁻¹ and V_B from the cross kernel.

    ``K_AB = J_A J_Bᵀ`` of shape (n_A·o_A, n_B·o_B). Returns ``overlap = ‖V_Aᵀ V_B‖_F² / r`` (r = min rank)
    and the principal-angle cosines (singular values of V_Aᵀ V_B).
    """
    M = (A.U.T @ K_AB.double() @ B.U) / torch.sqrt(A.S2)[:, None] / torch.sqrt(B.S2)[None, :]
    r = min(M.shape)
    cos = torch.linalg.svdvals(M)
    return {"overlap": float((M ** 2).sum()) / r, "cosines": [float(c) for c in cos[:r]]}


def eigenspace_basis(model, batches, space: Eigenspace, names: list[str], device=None) -> dict[str, torch.Tensor]:
    """The task's top-r parameter-space eigenvectors V = Jᵀ U Σ⁻¹ as ``{name: (r, *shape)}`` float32.

    J is the Jacobian of the task model's outputs on its kernel inputs (the examples of ``batches``, in
    order, the rows of ``space.U`` ordered (example, output)) with respect to the tensors ``names``. The r
    columns are orthonormal over those tensors (VᵀV = Σ⁻¹UᵀKUΣ⁻¹ = I). Costs one forward and r reverse
    passes per batch: the parameter-space vectors are formed once, so overlaps, energies and projections
    are then plain inner products (no cross-task kernels).
    """
    n = sum(b["input_ids"].shape[0] for b in batches)
    W = (space.U / torch.sqrt(space.S2)[None, :]).T  # (r, n·o)
    return vjp_params_many(model, batches, W.reshape(W.shape[0], n, -1).float(), list(names), device=device)


def basis_inner(VA: dict[str, torch.Tensor], VB: dict[str, torch.Tensor]) -> torch.Tensor:
    """``V_Aᵀ V_B`` ``(r_A, r_B)`` in float64 over the tensors both bases hold."""
    out = None
    for k in VA.keys() & VB.keys():
        a = VA[k].reshape(VA[k].shape[0], -1).double()
        b = VB[k].reshape(VB[k].shape[0], -1).to(a.device).double()
        t = a @ b.T
        out = t if out is None else out + t
    return out


def basis_coefficients(V: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Vᵀ δ`` ``(r,)`` in float64 (tensors of δ that V does not hold count as orthogonal)."""
    out = None
    for k in V.keys() & delta.keys():
        t = V[k].reshape(V[k].shape[0], -1).double() @ delta[k].reshape(-1).to(V[k].device).double()
        out = t if out is None else out + t
    return out


def basis_overlap(VA: dict, VB: dict) -> dict:
    """``‖V_Aᵀ V_B‖_F² / r`` (r = the smaller rank) and the principal-angle cosines, from two bases."""
    M = basis_inner(VA, VB)
    r = min(M.shape)
    cos = torch.linalg.svdvals(M)
    return {"overlap": float((M ** 2).sum()) / r, "cosines": [float(c) for c in cos[:r]]}


def loss_raising_coefficients(coef: torch.Tensor, residual_proj: torch.Tensor) -> torch.Tensor:
    """The part of ``coef`` (``Vᵀ τ``, ``(r,)``) that raises a task's loss to first order; zeros elsewhere.

    Moving the parameters by ``c_j·V_j`` moves the task's outputs by ``c_j·σ_j·U_j`` and its cross-entropy
    by ``−c_j·σ_j·(U_jᵀ r) / n`` to first order (``r = onehot(y) − softmax(f0)``, ``residual_proj = Uᵀ r``),
    so component j raises the loss exactly when ``c_j·(U_jᵀ r) < 0``.
    """
    return torch.where(coef * residual_proj < 0, coef, torch.zeros_like(coef))


def eigenspace_component(model, batches, space: Eigenspace, delta: dict, device=None) -> dict:
    """V Vᵀ δ: the component of a parameter-space direction δ in a task's top-r eigenspace.

    V = Jᵀ U Σ⁻¹ (orthonormal columns, :func:`eigenspace_basis`) for the task's Jacobian J on its kernel
    inputs (the examples of ``batches``, in order). Returns ``{name: tensor}`` with δ's keys.
    """
    V = eigenspace_basis(model, batches, space, list(delta), device=device)
    c = basis_coefficients(V, delta).float()
    return {k: torch.einsum("r,r...->...", c.to(V[k].device), V[k]) for k in delta}


def _flat_kernel(res) -> torch.Tensor:
    """(n1, n2, o1, o2) kernel → (n1·o1, n2·o2) matrix, rows ordered (example, output)."""
    K = res.kernel if hasattr(res, "kernel") else res
    n1, n2, o1, o2 = K.shape
    return K.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)


# --- the trust signal ---------------------------------------------------------------------------------------


def trust_band(first: torch.Tensor, half_second: torch.Tensor, predicted: torch.Tensor,
               max_uncertainty: float = 1.0) -> dict:
    """A prediction's own error estimate, computed before the merged model exists.

    Args:
        first: ``(n, o)`` first-order change J·Δ.
        half_second: ``(n, o)`` second-order term ½·D²f[Δ, Δ].
        predicted: ``(n, o)`` the second-order prediction f0 + J·Δ + ½·D²f[Δ, Δ].
        max_uncertainty: trust threshold in accuracy points.

    The Taylor series along Δ is treated as geometric with ratio ``ρ = ‖½D²f‖ / ‖J·Δ‖`` (Frobenius over the
    split; ``curvature``): the neglected third-order term of example i is estimated as
    ``e_i = ρ·max_a |½D²f_ia|``. The example is *uncertain* when its predicted top-1 margin (top logit minus
    runner-up) is at most ``2·e_i`` (a perturbation of ``e_i`` on every logit could swap them).
    ``uncertainty`` is the share of uncertain examples in points: how far the predicted accuracy could move.
    ``trusted``: ``uncertainty ≤ max_uncertainty`` and ``ρ < 1`` (a series whose second term is not smaller
    than its first is not trusted at all).
    """
    num, den = float(half_second.norm()), float(first.norm())
    rho = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    if predicted.shape[-1] > 1:
        top2 = predicted.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
    else:  # one output: the sign decides
        margin = predicted[:, 0].abs()
    e = rho * half_second.abs().amax(dim=-1) if math.isfinite(rho) else torch.full_like(margin, float("inf"))
    unc = 100 * float((margin <= 2 * e).float().mean()) if margin.numel() else 0.0
    return {"curvature": rho, "uncertainty": unc, "trusted": bool(unc <= max_uncertainty and rho < 1)}
