"""Explain, predict and validate task-vector merges through the base model's linearisation and eNTK.

For a fine-tuning run with task vectors τ_t (``RUN/vectors``) and per-task heads, :func:`validate_run`

* **predicts** every task's outputs under a merge θ0 + Δ from the linearised model
  f0 + J·Δ + ½·D²f[Δ, Δ], using Jacobian-vector products only. Task-arithmetic merges
  θ0 + Σ_t α_t τ_t are linear in the α's to first order, so after one (batched) JVP per task over all
  τ_t every coefficient setting is predicted for free; the second-order term along Στ (float64 central
  differences: two forward passes, :func:`taskvec.linearize.finite_difference_derivatives`) scales with λ².
  Other methods (TIES, TSV, ...) cost two float64 forward passes per merge and task;
* attaches to every prediction its own **trust signal**, known before merging (:func:`trust_band`): the
  curvature ratio ‖½D²f‖/‖J·Δ‖ and the share of examples whose predicted decision could flip under the
  neglected higher-order terms ("uncertainty", in accuracy points); predictions above ``max_uncertainty``
  are flagged untrusted;
* **measures** the same merges by building them and evaluating each task on its evaluation subset
  with its own head, and reports predicted vs measured accuracy (Spearman on accuracy changes, mean
  absolute error of trusted and flagged predictions, a calibration table of error vs uncertainty), the
  measured linearisation error ‖f(θ0+Δ) − f_lin‖ / ‖f(θ0+Δ) − f0‖, normalised accuracy,
  the interference matrix I[s, t] (accuracy change of task s caused by τ_t alone), and the
  disentanglement error ξ of every pair (Ortiz-Jimenez et al.);
* **explains** through the eNTK (:mod:`taskvec.ntk`) of each task at θ0: its top-r eigenvectors mapped to
  parameter space once, V = Jᵀ U Σ⁻¹ (r reverse passes, :func:`eigenspace_basis`), give the overlap of
  the tasks' eigenspaces ``‖V_Aᵀ V_B‖_F² / r`` (random baseline r/p, split-half same-task ceiling) and the
  share of ‖τ_t‖² inside task s's top-r eigenspace as inner products;
* **chooses coefficients** by maximising the predicted average normalised accuracy (global λ, and one
  per task), with one full evaluation instead of a grid search;
* builds an **NTK-aware merge**: each τ_t minus its projection on the other tasks' top-r eigenspaces
  (V_s V_sᵀ τ_t), then added.

Definitions: ``../shared/THEORY.md`` ("Linearised predictions", "Eigenspaces and overlaps"). All results
are plain JSON (``RUN/validation/results.json``); figures are drawn from it by :mod:`taskvec.report`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import TaskvecError
from .io import write_json
from .linearize import (
    Directional,
    accuracy,
    directional_outputs,
    forward_outputs,
    relative_linearisation_error,
    vjp_params_many,
)


@dataclass
class MergeSpec:
    """One merge to predict and measure: a registered method of :mod:`taskvec.merge` (or ``ntk_aware``)
    and its parameters (``lambda``, ``density``, ...)."""

    name: str
    method: str
    params: dict = field(default_factory=dict)


DEFAULT_MERGES = [
    MergeSpec("task_arithmetic λ=0.5", "task_arithmetic", {"lambda": 0.5}),
    MergeSpec("task_arithmetic λ=1", "task_arithmetic", {"lambda": 1.0}),
    MergeSpec("ties d=0.2", "ties", {"density": 0.2, "lambda": 1.0}),
    MergeSpec("tsv", "tsv", {"lambda": 1.0}),
]
DEFAULT_LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2]


# --- merging task vectors in memory ---------------------------------------------------------------------


def merge_vectors(vectors: list, method: str, base_state: dict[str, torch.Tensor], **params) -> dict:
    """Merged delta ``{name: Δ}`` of task vectors with a registered merge method, in memory.

    Per-model parameters (``weight``, ``density``, ``gamma``) may be scalars or lists of T values; random
    methods get a per-tensor seed derived from ``seed`` and the tensor name, as the streaming engine does.
    """
    from .merge.engine import _tensor_seed
    from .merge.methods import get_method

    m = get_method(method)
    T = len(vectors)
    unknown = set(params) - set(m.param_names)
    if unknown:
        raise TaskvecError(f"unknown parameters {sorted(unknown)} for {method}; valid: {m.param_names}")
    kw = {}
    for p in m.params:
        v = params.get(p.name, p.default)
        kw[p.name] = (list(v) if isinstance(v, (list, tuple)) else [v] * T) if p.per_model else v
    weights = kw.pop("weight")
    names = sorted(set().union(*[v.deltas for v in vectors]))
    out = {}
    for name in names:
        base = base_state[name].float()
        deltas = [v.deltas[name].float().clone() if name in v.deltas else torch.zeros_like(base) for v in vectors]
        call = dict(kw)
        if m.random:
            call["seed"] = _tensor_seed(int(kw.get("seed", 0)), name)
        out[name] = m(base, deltas, list(weights), **call)
    return out


# --- helpers -------------------------------------------------------------------------------------------


def _spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def _add(a: dict, b: dict, cb: float = 1.0) -> dict:
    out = {k: v.clone() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] + cb * v if k in out else cb * v
    return out


def _scale(a: dict, c: float) -> dict:
    return {k: c * v for k, v in a.items()}


class _Backbone:
    """One shared backbone whose scope tensors can be set to θ0 + Δ and restored exactly."""

    def __init__(self, backbone, names):
        self.bb = backbone
        self.params = dict(backbone.named_parameters())
        self.orig = {k: self.params[k].detach().clone() for k in names}

    @torch.no_grad()
    def set(self, delta: dict | None):
        for k, v in self.orig.items():
            self.params[k].copy_(v)
        for k, d in (delta or {}).items():
            self.params[k].add_(d.to(self.params[k].device, self.params[k].dtype))


def _logits(model, batches, device) -> torch.Tensor:
    return forward_outputs(model, batches, device)[0].float()


def _xi(f_single: list[torch.Tensor], f_joint: list[torch.Tensor]) -> float:
    """Σ_t mean 1{argmax f_single_t ≠ argmax f_joint_t} over the two tasks."""
    return float(sum((a.argmax(-1) != b.argmax(-1)).float().mean() for a, b in zip(f_single, f_joint)))


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


# --- the validation ----------------------------------------------------------------------------------------


def validate_run(run_dir, merges: list[MergeSpec] | None = None, n_eval: int = 500, n_kernel: int = 128,
                 rank: int = 20, lambdas: list[float] | None = None, second_order: bool = True,
                 max_uncertainty: float = 1.0, ntk_aware: bool = True, device: str | None = None,
                 out: str | Path | None = None, progress: bool = True) -> dict:
    """Predict, measure and explain merges of a run's task vectors; write ``RUN/validation/results.json``.

    Args:
        run_dir: a run with ``finetune/<task>/`` and ``vectors/<task>.safetensors``.
        merges: merges to predict and measure (default :data:`DEFAULT_MERGES`).
        n_eval: evaluation examples per task (a seeded subset of its test split).
        n_kernel: training examples per task for the eNTK eigenspaces.
        rank: r of the top-r eigenspaces.
        lambdas: the global-λ grid of the grid-search baseline (task arithmetic).
        second_order: add the second-order term ½·D²f[Δ, Δ] along each merge direction (float64 central
            differences; see :func:`taskvec.linearize.directional_outputs`).
        max_uncertainty: the trust threshold, in accuracy points: a prediction is trusted when at most
            this share of its task's evaluation examples lies inside the uncertainty band of
            :func:`trust_band` (needs ``second_order``; first-order-only predictions are all untrusted).
        ntk_aware: also build, predict and measure the NTK-aware merges: ``ntk_aware`` (each τ_t minus its
            component in the other tasks' top-r eigenspaces) and ``ntk_aware_harmful`` (minus only the
            components that raise the other task's training loss to first order), at the prediction-chosen λ.
    """
    from tqdm.auto import tqdm

    from .finetune import load_run
    from .modeling import load_backbone, load_task_model, load_tokenizer
    from .task_vector import TaskVector
    from .tasks import Batches, Splits, load_saved_task, load_task

    t_start = time.time()
    run_dir = Path(run_dir)
    meta = load_run(run_dir)
    names = list(meta["tasks"])
    T = len(names)
    if T < 2:
        raise TaskvecError(f"{run_dir}: validation needs at least two tasks, found {names}")
    merges = list(DEFAULT_MERGES if merges is None else merges)
    lambdas = list(DEFAULT_LAMBDAS if lambdas is None else lambdas)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vec_paths = {t: run_dir / "vectors" / f"{t}.safetensors" for t in names}
    missing = [t for t, p in vec_paths.items() if not p.exists()]
    if missing:
        raise TaskvecError(f"{run_dir}: no task vectors for {missing}; run `taskvec vectors {run_dir}` first")
    vectors = {t: TaskVector.load(p) for t, p in vec_paths.items()}
    fps = {v.base_fingerprint for v in vectors.values()}
    if len(fps) > 1:
        raise TaskvecError(f"task vectors of {run_dir} come from different base models: {sorted(fps)}")
    scopes = {v.scope for v in vectors.values()}
    if len(scopes) > 1:
        raise TaskvecError(f"task vectors of {run_dir} have different scopes: {sorted(scopes)}")

    tok = load_tokenizer(meta["base_model"])
    bb = load_backbone(meta["base_model"], attn_implementation="eager").to(device)
    keys = sorted(set().union(*[v.deltas for v in vectors.values()]))
    shared = _Backbone(bb, keys)
    base_state = {k: shared.orig[k].cpu() for k in keys}
    models, eval_batches, kernel_batches, ft_acc_log = {}, {}, {}, {}
    for t in names:
        d = run_dir / "finetune" / t
        models[t] = load_task_model(d, backbone=bb).to(device)
        log = json.loads((d / "log.json").read_text())
        spec = json.loads((d / "head.json").read_text())
        ft_acc_log[t] = log["test_accuracy"]
        split = Splits.from_json(json.loads((d / "split.json").read_text()))
        task = load_saved_task(d / "task.json") if (d / "task.json").exists() else load_task(t)
        rng = np.random.default_rng(0)
        test = sorted(rng.permutation(split.test)[:n_eval].tolist())
        train = sorted(rng.permutation(split.train)[:n_kernel].tolist())
        prompt = spec.get("prompt") if spec.get("kind") == "label_words" else None
        ml = log.get("config", {}).get("max_length", 128)
        eval_batches[t] = Batches(tok, task, test, 64, max_length=ml, prompt=prompt, sort_by_length=True)
        kernel_batches[t] = Batches(tok, task, train, 64, max_length=ml, prompt=prompt)

    # merged deltas of the configured merges (task arithmetic is also predicted from the τ directions)
    tvs = [vectors[t] for t in names]
    merge_deltas = {m.name: merge_vectors(tvs, m.method, base_state, **m.params)
                    for m in merges if m.method != "ntk_aware"}
    sum_tau = {k: sum(v.deltas[k].float() for v in tvs if k in v.deltas) for k in keys}

    # --- eigenspaces (eNTK at θ0 with each task's head), parameter-space bases and the NTK-aware merge
    timings: dict[str, float] = {}
    tick = time.time()
    eigen: dict = {}
    spaces: dict[str, Eigenspace] = {}
    if ntk_aware or rank > 0:
        from .ntk import as_batch, empirical_ntk

        scope = meta["scope"] if meta["scope"] != "lora" else "re:" + "|".join(k.replace(".", r"\.") for k in keys)
        Ks, bases = {}, {}
        for t in tqdm(names, desc="eNTK eigenspaces", disable=not progress):
            kin = as_batch(list(kernel_batches[t]), device)
            Ks[t] = _flat_kernel(empirical_ntk(models[t], kin, params=scope, kernel="full", groups=False))
            spaces[t] = top_eigenspace(Ks[t], rank)
            bases[t] = eigenspace_basis(models[t], kernel_batches[t], spaces[t], keys, device=device)
        timings["eigenspaces"] = time.time() - tick
        p_total = sum(base_state[k].numel() for k in keys)
        overlap = np.eye(T)
        for i, a in enumerate(names):
            for j in range(i + 1, T):
                overlap[i, j] = overlap[j, i] = basis_overlap(bases[a], bases[names[j]])["overlap"]
        split_half = {}
        for t in names:
            n = len(kernel_batches[t].indices)
            o = Ks[t].shape[0] // n
            h = (n // 2) * o
            K = Ks[t]
            r_half = min(rank, h // 2)
            A, B = top_eigenspace(K[:h, :h], r_half), top_eigenspace(K[h:2 * h, h:2 * h], r_half)
            split_half[t] = subspace_overlap(A, B, K[:h, h:2 * h])["overlap"]
        # where each task vector lives: share of ‖τ_t‖² in task s's top-r eigenspace, ‖V_sᵀ τ_t‖² / ‖τ_t‖²
        energy = np.zeros((T, T))
        coef = {}
        for i, s in enumerate(names):
            for j, t in enumerate(names):
                coef[(s, t)] = c = basis_coefficients(bases[s], vectors[t].deltas)
                nt = vectors[t].norm()
                energy[i, j] = float((c ** 2).sum()) / nt ** 2 if nt > 0 else float("nan")
        eigen = {"rank": rank, "n_kernel": n_kernel, "p": p_total, "random_baseline": rank / p_total,
                 "overlap": overlap.tolist(), "split_half": split_half,
                 "energy": [[None if math.isnan(x) else x for x in row] for row in energy.tolist()],
                 "spectra": {t: spaces[t].eigenvalues[:200].tolist() for t in names}}
        if ntk_aware:
            # which of task s's eigendirections lower its training loss: g_s = Uᵀ r_s, r_s = onehot(y) − softmax(f0)
            # on the kernel inputs; moving by c·V_j changes the loss by ≈ −σ_j·g_j·c / n (first order)
            helps = {}
            for s in names:
                f0k, yk = forward_outputs(models[s], kernel_batches[s], device)
                r = (torch.nn.functional.one_hot(yk, f0k.shape[-1]).double() - f0k.double().softmax(-1)).reshape(-1)
                helps[s] = spaces[s].U.T @ r  # (r,)
            proj, harm = {}, {}
            for t in names:  # τ_t' = τ_t − Σ_{s≠t} V_s V_sᵀ τ_t ; τ_t'' removes only the loss-raising part
                delta = {k: v.float().clone() for k, v in vectors[t].deltas.items()}
                delta_h = {k: v.float().clone() for k, v in vectors[t].deltas.items()}
                for s in names:
                    if s != t:
                        c = coef[(s, t)]
                        ch = loss_raising_coefficients(c, helps[s])
                        for k in delta:
                            if k in bases[s]:
                                Vk = bases[s][k]
                                delta[k] -= torch.einsum("r,r...->...", c.float().to(Vk.device), Vk).cpu()
                                delta_h[k] -= torch.einsum("r,r...->...", ch.float().to(Vk.device), Vk).cpu()
                proj[t], harm[t] = delta, delta_h
            ntk_sum = {k: sum(proj[t][k] for t in names if k in proj[t]) for k in keys}
            harm_sum = {k: sum(harm[t][k] for t in names if k in harm[t]) for k in keys}

            def removed(d: dict, t: str):
                nt = vectors[t].norm()
                return 1 - math.sqrt(sum(float((d[k] ** 2).sum()) for k in d)) / nt if nt > 0 else None

            eigen["ntk_aware_removed_share"] = {t: removed(proj[t], t) for t in names}
            eigen["ntk_aware_harmful_removed_share"] = {t: removed(harm[t], t) for t in names}
        del bases, Ks
    timings["eigen_total"] = time.time() - tick

    # --- predictions: one batched JVP per task over all τ_t; central differences along Σ τ and each other merge
    tick = time.time()
    dir_specs = {f"tau:{t}": vectors[t].deltas for t in names}
    second_specs = {"sum": sum_tau}
    for m in merges:
        if m.method != "task_arithmetic" and m.name in merge_deltas:
            second_specs[m.name] = merge_deltas[m.name]
    if ntk_aware:
        second_specs["ntk_sum"] = ntk_sum
        second_specs["ntk_harm_sum"] = harm_sum
    D: dict[str, Directional] = {}
    for s in tqdm(names, desc="linearised predictions", disable=not progress):
        d1 = directional_outputs(models[s], eval_batches[s], dir_specs, device=device)
        d2 = directional_outputs(models[s], eval_batches[s], second_specs, second_order=second_order,
                                 device=device)
        d1.jvps.update(d2.jvps)
        d1.hvps.update(d2.hvps)
        D[s] = d1
    timings["predictions"] = time.time() - tick

    # --- measurements: build each merged model once, evaluate every task with its own head
    tick = time.time()
    evaluations = 0

    def measure(delta) -> dict:
        nonlocal evaluations
        shared.set(delta)
        res = {s: _logits(models[s], eval_batches[s], device) for s in names}
        shared.set(None)
        evaluations += 1
        return res

    base_logits = {s: D[s].f0 for s in names}
    base_acc = {s: accuracy(D[s].f0, D[s].labels) for s in names}
    singles = {t: measure(vectors[t].deltas) for t in tqdm(names, desc="single-task models", disable=not progress)}
    ft_acc = {s: accuracy(singles[s][s], D[s].labels) for s in names}

    def record(first: dict[str, torch.Tensor], half_second: dict[str, torch.Tensor] | None,
               measured: dict) -> dict:
        """Per task: predictions from the first-order change J·Δ and (optionally) the second-order term
        ½·D²f[Δ, Δ], both ``(n, o)``, against the measured logits; with the trust band."""
        per = {}
        for s in names:
            f_true, f0, y = measured[s], base_logits[s], D[s].labels
            p1 = f0 + first[s]
            entry = {"base": base_acc[s], "predicted_1st": accuracy(p1, y), "measured": accuracy(f_true, y),
                     "lin_error": relative_linearisation_error(f_true, f0, p1), "finetuned": ft_acc[s]}
            if half_second is not None:
                p2 = p1 + half_second[s]
                entry["predicted_2nd"] = accuracy(p2, y)
                entry["lin_error_2nd"] = relative_linearisation_error(f_true, f0, p2)
                entry.update(trust_band(first[s], half_second[s], p2, max_uncertainty))
                entry["predicted"] = entry["predicted_2nd"]
            else:
                entry.update({"curvature": None, "uncertainty": None, "trusted": False})
                entry["predicted"] = entry["predicted_1st"]
            entry["normalized_measured"] = entry["measured"] / ft_acc[s] if ft_acc[s] else None
            entry["normalized_predicted"] = entry["predicted"] / ft_acc[s] if ft_acc[s] else None
            per[s] = entry
        return per

    def ta_terms(coefs: dict[str, float]) -> tuple[dict, dict | None]:
        """J·Δ and ½·D²f[Δ, Δ] of θ0 + Σ_t c_t τ_t per task: first order exact in every coefficient; the
        second-order term is ½·c̄²·D²f[Στ, Στ] (c̄ = mean coefficient: exact for a global λ, the
        along-the-sum approximation for per-task coefficients)."""
        first = {s: sum(c * D[s].jvps[f"tau:{t}"] for t, c in coefs.items()) for s in names}
        if not (second_order and "sum" in D[names[0]].hvps):
            return first, None
        cbar = float(np.mean(list(coefs.values())))
        return first, {s: 0.5 * cbar ** 2 * D[s].hvps["sum"] for s in names}

    def merge_terms(name: str, lam: float = 1.0) -> tuple[dict, dict | None]:
        first = {s: lam * D[s].jvps[name] for s in names}
        half = {s: 0.5 * lam ** 2 * D[s].hvps[name] for s in names} if name in D[names[0]].hvps else None
        return first, half

    results_merges = []
    for m in tqdm(merges, desc="merges", disable=not progress):
        if m.method == "task_arithmetic" and not set(m.params) - {"lambda"}:
            lam = float(m.params.get("lambda", 1.0))
            terms = ta_terms({t: lam for t in names})
            delta = _scale(sum_tau, lam)
        else:
            delta = merge_deltas[m.name]
            terms = merge_terms(m.name)
        results_merges.append({"name": m.name, "method": m.method, "params": m.params,
                               "per_task": record(*terms, measure(delta))})

    # --- interference matrices (accuracy change of task s caused by τ_t alone) and ξ of every pair
    I_pred, I_meas = np.zeros((T, T)), np.zeros((T, T))
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            I_pred[i, j] = accuracy(D[s].predict({f"tau:{t}": 1.0}), D[s].labels) - base_acc[s]
            I_meas[i, j] = accuracy(singles[t][s], D[s].labels) - base_acc[s]
    xi = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            joint = measure(_add(vectors[a].deltas, vectors[b].deltas))
            pa, pb = D[a].predict({f"tau:{a}": 1.0}), D[b].predict({f"tau:{b}": 1.0})
            ja, jb = (D[a].predict({f"tau:{a}": 1.0, f"tau:{b}": 1.0}),
                      D[b].predict({f"tau:{a}": 1.0, f"tau:{b}": 1.0}))
            xi.append({"pair": [a, b], "predicted": _xi([pa, pb], [ja, jb]),
                       "measured": _xi([singles[a][a], singles[b][b]], [joint[a], joint[b]])})

    # --- coefficients: grid search (measured) vs prediction-chosen (one evaluation)
    def avg_norm(per: dict, key: str) -> float:
        return float(np.mean([per[s][key] / ft_acc[s] for s in names]))

    grid = []
    before = evaluations
    for lam in tqdm(lambdas, desc="λ grid (measured)", disable=not progress):
        per = record(*ta_terms({t: lam for t in names}), measure(_scale(sum_tau, lam)))
        grid.append({"lambda": lam, "measured": avg_norm(per, "measured"), "predicted": avg_norm(per, "predicted"),
                     "per_task": per})
    grid_evals = evaluations - before
    fine = np.round(np.arange(0.05, 2.0001, 0.05), 4).tolist()

    def pred_avg(coefs) -> float:
        first, half = ta_terms(coefs)
        return float(np.mean([accuracy(base_logits[s] + first[s] + (half[s] if half else 0), D[s].labels)
                              / ft_acc[s] for s in names]))

    lam_star = max(fine, key=lambda lam: (pred_avg({t: lam for t in names}), -abs(lam - 0.5)))
    coefs = {t: lam_star for t in names}
    window = [c for c in fine if 0.5 * lam_star <= c <= 1.5 * lam_star]  # stay near the trusted global λ
    for _ in range(2):  # coordinate ascent on per-task coefficients, predictions only
        for t in names:
            coefs[t] = max(window, key=lambda c: (pred_avg({**coefs, t: c}), -abs(c - coefs[t])))
    chosen = {}
    for label, cf in (("global", {t: lam_star for t in names}), ("per_task", coefs)):
        delta = {k: sum(cf[t] * vectors[t].deltas[k].float() for t in names if k in vectors[t].deltas) for k in keys}
        per = record(*ta_terms(cf), measure(delta))
        chosen[label] = {"coefficients": cf, "predicted": avg_norm(per, "predicted"),
                         "measured": avg_norm(per, "measured"), "per_task": per}
    best = max(grid, key=lambda g: g["measured"])
    coefficients = {"grid": [{k: v for k, v in g.items() if k != "per_task"} for g in grid],
                    "grid_best_lambda": best["lambda"], "grid_best_measured": best["measured"],
                    "grid_evaluations": grid_evals, "chosen": chosen, "chosen_evaluations": 1,
                    "gap_points_global": 100 * (best["measured"] - chosen["global"]["measured"]),
                    "gap_points_per_task": 100 * (best["measured"] - chosen["per_task"]["measured"])}

    if ntk_aware:
        lam = lam_star
        per = record(*merge_terms("ntk_sum", lam), measure(_scale(ntk_sum, lam)))
        results_merges.append({"name": f"ntk_aware λ={lam:g}", "method": "ntk_aware", "params": {"lambda": lam},
                               "per_task": per})
        per = record(*merge_terms("ntk_harm_sum", lam), measure(_scale(harm_sum, lam)))
        results_merges.append({"name": f"ntk_aware_harmful λ={lam:g}", "method": "ntk_aware_harmful",
                               "params": {"lambda": lam}, "per_task": per})
        per = record(*ta_terms({t: lam for t in names}), measure(_scale(sum_tau, lam)))
        results_merges.append({"name": f"task_arithmetic λ={lam:g}", "method": "task_arithmetic",
                               "params": {"lambda": lam}, "per_task": per})
    timings["measurements_and_search"] = time.time() - tick

    # --- summary over all merges
    rows = [(m["name"], s, e) for m in results_merges for s, e in m["per_task"].items()]
    dm = [e["measured"] - e["base"] for *_, e in rows]

    def scores(key: str) -> tuple[float | None, float]:
        dp = [e[key] - e["base"] for *_, e in rows]
        return _spearman(dp, dm), 100 * float(np.mean([abs(a - b) for a, b in zip(dp, dm)]))

    summary = {"n_predictions": len(rows), "order": 2 if second_order else 1,
               "mae_points_nochange_baseline": 100 * float(np.mean([abs(x) for x in dm])),
               "max_uncertainty": max_uncertainty}
    summary["spearman_change"], summary["mae_points"] = scores("predicted")
    summary["spearman_change_1st"], summary["mae_points_1st"] = scores("predicted_1st")
    summary["spearman_accuracy"] = _spearman([e["predicted"] for *_, e in rows], [e["measured"] for *_, e in rows])
    trusted = [100 * abs(e["predicted"] - e["measured"]) for *_, e in rows if e["trusted"]]
    flagged = [100 * abs(e["predicted"] - e["measured"]) for *_, e in rows if not e["trusted"]]
    summary.update({"n_trusted": len(trusted), "n_untrusted": len(flagged),
                    "mae_points_trusted": float(np.mean(trusted)) if trusted else None,
                    "mae_points_untrusted": float(np.mean(flagged)) if flagged else None})
    if second_order:  # how the error grows with the predicted uncertainty: pick a threshold from this
        calib = []
        for u in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, float("inf")):
            errs = [100 * abs(e["predicted"] - e["measured"]) for *_, e in rows if e["uncertainty"] <= u]
            calib.append({"max_uncertainty": None if math.isinf(u) else u, "n": len(errs),
                          "mae_points": float(np.mean(errs)) if errs else None,
                          "max_error_points": float(np.max(errs)) if errs else None})
        summary["calibration"] = calib
    summary["interference_spearman"] = _spearman(I_pred[~np.eye(T, dtype=bool)].tolist(),
                                                 I_meas[~np.eye(T, dtype=bool)].tolist())

    cos = TaskVector.cosine_matrix(tvs)
    signs = np.zeros((T, T))
    for i in range(T):
        for j in range(T):
            a, b = tvs[i].deltas, tvs[j].deltas
            both = conflict = 0
            for k in a.keys() & b.keys():
                nz = (a[k] != 0) & (b[k] != 0)
                both += int(nz.sum())
                conflict += int((nz & (torch.sign(a[k]) != torch.sign(b[k]))).sum())
            signs[i, j] = conflict / both if both else 0.0

    results = {
        "run": str(run_dir), "tasks": names, "n_eval": {s: len(eval_batches[s].indices) for s in names},
        "device": str(device), "second_order": second_order,
        "base_accuracy": base_acc, "finetuned_accuracy": ft_acc, "finetuned_accuracy_full_test": ft_acc_log,
        "merges": results_merges, "summary": summary,
        "interference": {"predicted": I_pred.tolist(), "measured": I_meas.tolist()},
        "disentanglement": xi, "coefficients": coefficients, "eigen": eigen,
        "weight_space": {"cosine": cos.tolist(), "sign_conflicts": signs.tolist()},
        "evaluations": evaluations, "timings_s": timings, "wall_time_s": time.time() - t_start,
    }
    out = Path(out) if out else run_dir / "validation" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    return results
