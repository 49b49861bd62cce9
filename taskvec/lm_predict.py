"""Linearised predictions of LM metrics along merge directions, in nats.

For an LM task model (:func:`taskvec.lm_objective.make_lm_model`) the output of example i is its summed
log-likelihood ``ℓ_i(θ) = Σ_t log p(y_t | y_<t; θ)`` over its scored (continuation) tokens
(``output="loglik"`` of :func:`taskvec.modelfn.reduce_outputs`). Along a merge direction Δ,

    ℓ_i(θ0 + Δ) ≈ ℓ_i(θ0) + J_i·Δ + ½·D²ℓ_i[Δ, Δ]

with J·Δ from forward-mode JVPs (all directions of a batch together, inside the memory budget of
:func:`taskvec.linearize.jvp_many`) and the second directional derivative from a nested JVP
(:func:`taskvec.linearize.jvp_batch`). The corpus figure is the mean NLL ``−Σ ℓ_i / Σ n_i`` (nats per
token), so its change is ``−Σ Δℓ_i / Σ n_i``.

Trust band, in the metric's own unit (:func:`trust_band_nats`), built as the accuracy band is
(:func:`taskvec.interference.trust_band`): the curvature ρ = ‖½D²ℓ[Δ, Δ]‖ / ‖J·Δ‖ over the examples is the
ratio of the Taylor series along Δ; the neglected third-order term of example i is estimated as
``e_i = ρ·|½D²ℓ_i|`` (geometric series), and the uncertainty of the predicted mean-NLL change is
``Σ e_i / Σ n_i`` nats per token; trusted when ρ < 1 and the uncertainty is at most ``max_uncertainty``.

Shapes: ``n`` examples; every per-example tensor is ``(n,)`` float64 nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import TaskvecError
from .linearize import jvp_batch, jvp_many
from .modelfn import eval_mode, reduce_outputs


@dataclass
class LoglikDerivatives:
    """Per-example log-likelihoods at θ0 and their directional derivatives.

    Attributes:
        f0: ``(n,)`` ℓ_i(θ0), nats.
        n_tokens: ``(n,)`` scored tokens per example.
        first: ``{direction: (n,)}`` J_i·Δ (nats per unit step along Δ).
        half_second: ``{direction: (n,)}`` ½·D²ℓ_i[Δ, Δ] (nats), for the directions computed to second order.
    """

    f0: torch.Tensor
    n_tokens: torch.Tensor
    first: dict = field(default_factory=dict)
    half_second: dict = field(default_factory=dict)

    def predict(self, coefs: dict[str, float], second_order: bool = True) -> torch.Tensor:
        """ℓ(θ0 + Σ_d c_d Δ_d) ≈ f0 + Σ_d c_d·J·Δ_d (+ Σ_d c_d²·½D²ℓ[Δ_d, Δ_d]; cross terms between
        directions are not included: compute the merged direction itself for them). ``(n,)`` nats."""
        out = self.f0.clone()
        for d, c in coefs.items():
            out += c * self.first[d]
            if second_order and d in self.half_second:
                out += c * c * self.half_second[d]
        return out


def _batches_on(batches, device):
    for b in batches:
        if "labels" not in b or b["labels"].dim() != 2:
            raise TaskvecError("LM predictions need LM batches (labels (B, L) with -100 off the continuation; "
                               "taskvec.lm_objective.LMBatches)")
        yield b if device is None else {k: v.to(device) for k, v in b.items()}


def loglik_derivatives(model, batches, directions: dict[str, dict[str, torch.Tensor]],
                       second_order: list[str] | bool = True, max_memory=None, device=None) -> LoglikDerivatives:
    """f0, J·Δ_d for every direction and ½·D²ℓ[Δ_d, Δ_d] for the directions in ``second_order`` (all of them
    when ``True``, none when ``False``) over the LM ``batches``. First order: one batched JVP per batch over
    all directions (:func:`taskvec.linearize.jvp_many`, within ``max_memory``); second order: a nested JVP
    per direction and batch."""
    if not directions:
        raise TaskvecError("loglik_derivatives needs at least one direction")
    want2 = list(directions) if second_order is True else list(second_order or [])
    unknown = [d for d in want2 if d not in directions]
    if unknown:
        raise TaskvecError(f"second_order names unknown directions {unknown}; directions: {list(directions)}")
    f0s, counts = [], []
    first: dict[str, list] = {d: [] for d in directions}
    half: dict[str, list] = {d: [] for d in want2}
    for b in _batches_on(batches, device):
        f0, js = jvp_many(model, b, list(directions.values()), max_memory=max_memory, output="loglik")
        f0s.append(f0[:, 0].double().cpu())
        counts.append((b["labels"] != -100).sum(1).cpu())
        for d, j in zip(directions, js):
            first[d].append(j[:, 0].double().cpu())
        for d in want2:
            _, _, hdd = jvp_batch(model, b, directions[d], second_order=True, output="loglik")
            half[d].append(0.5 * hdd[:, 0].double().cpu())
    return LoglikDerivatives(torch.cat(f0s), torch.cat(counts), {d: torch.cat(v) for d, v in first.items()},
                             {d: torch.cat(v) for d, v in half.items()})


@torch.no_grad()
def measured_logliks(model, batches, device=None) -> torch.Tensor:
    """ℓ_i of ``model`` as it is (e.g. with a merge applied), ``(n,)`` float64 nats, in the batches' order."""
    out = []
    with eval_mode(model):
        for b in _batches_on(batches, device):
            logits = model(b["input_ids"], b["attention_mask"])
            out.append(reduce_outputs(logits, b["labels"], "loglik")[:, 0].double().cpu())
    return torch.cat(out)


def mean_nll_change(delta_loglik: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """Change of the corpus mean NLL, ``−Σ Δℓ_i / Σ n_i`` (nats per token)."""
    total = int(n_tokens.sum())
    if total == 0:
        raise TaskvecError("no scored tokens")
    return -float(delta_loglik.double().sum()) / total


def trust_band_nats(first: torch.Tensor, half_second: torch.Tensor, n_tokens: torch.Tensor,
                    max_uncertainty: float = 0.05) -> dict:
    """The trust band of a predicted mean-NLL change (see the module docstring).

    Returns ``{"curvature": ρ, "uncertainty": Σ e_i / Σ n_i (nats per token), "trusted": bool,
    "predicted_change": −Σ (J·Δ + ½D²) / Σ n_i, "predicted_change_1st": −Σ J·Δ / Σ n_i}``.
    """
    f, h = first.double(), half_second.double()
    nf = float(f.norm())
    rho = float(h.norm()) / nf if nf > 0 else (0.0 if float(h.norm()) == 0 else float("inf"))
    total = int(n_tokens.sum())
    if total == 0:
        raise TaskvecError("no scored tokens")
    unc = rho * float(h.abs().sum()) / total if rho != float("inf") else float("inf")
    return {"curvature": rho, "uncertainty": unc, "trusted": bool(rho < 1 and unc <= max_uncertainty),
            "predicted_change": mean_nll_change(f + h, n_tokens), "predicted_change_1st": mean_nll_change(f, n_tokens)}
