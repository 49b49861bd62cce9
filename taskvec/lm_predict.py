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


# --- predictions from the linearised next-token logits ---------------------------------------------------------
#
# The linearised model of the mission is linear in the model's *outputs*, the next-token logits z (as the
# accuracy path linearises class logits and takes the argmax): z(θ0 + Σ_d c_d Δ_d) ≈ z0 + Σ_d c_d·J_z·Δ_d
# (+ Σ_d c_d²·½D²z[Δ_d, Δ_d]), and the metric is computed from the predicted logits,
# ℓ_i = Σ_t log_softmax(z_t)[y_t]. The log-softmax saturates where the log-likelihood's own Taylor series
# (above) does not: a predicted NLL is never negative. The same pass gives the log-likelihood's derivatives,
# dℓ = dz_y − p·dz and d²ℓ = d²z_y − p·d²z − Var_p(dz) per token (p = softmax(z0)).

#: scored tokens per chunk of the per-token computations ((chunk, V) float64 tensors)
TOKEN_CHUNK = 128


@dataclass
class LogitPredictions:
    """Per-example log-likelihoods predicted from the linearised next-token logits (see above).

    Attributes:
        predicted: ``{combination: (n,)}`` ℓ_i from the second-order logits (first order where a direction
            of the combination has no second derivative), nats.
        predicted_1st: ``{combination: (n,)}`` ℓ_i from the first-order logits, nats.
        second: ``{combination: bool}`` whether ``predicted`` is second order.
        curvature: ``{combination: ρ}`` ‖Σ c²·½D²z‖ / ‖Σ c·J_z·Δ‖ over every scored token's logits.
        remainder: ``{combination: (n,)}`` estimated error of ``predicted`` (nats, ≥ 0): the neglected next
            term taken as ρ_i times the second-order term of the logits (ρ_i the example's own ratio), its
            effect on ℓ_i, the larger of the two signs; only for the combinations asked for.
    """

    predicted: dict = field(default_factory=dict)
    predicted_1st: dict = field(default_factory=dict)
    second: dict = field(default_factory=dict)
    curvature: dict = field(default_factory=dict)
    remainder: dict = field(default_factory=dict)


class _NoHead(torch.nn.Module):
    def forward(self, hidden, backbone=None):
        return hidden


class FeatureModel(torch.nn.Module):
    """An LM task model without its LM head: ``(B, L, H)`` final hidden states, the same backbone module (so
    the same parameter names). Its JVPs are 1/V·H the size of the logits'; the logits follow as ``h·Wᵀ``."""

    def __init__(self, task_model):
        super().__init__()
        self.backbone, self.head, self.spec = task_model.backbone, _NoHead(), task_model.spec


def head_weight(model, directions) -> torch.Tensor | None:
    """The LM head's ``(V, H)`` weight of an LM task model when no direction changes it (the logits are then
    linear in the final hidden states with a fixed matrix), else ``None``."""
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "tied"):
        return None
    if not head.tied:
        return head.weight
    w = model.backbone.get_input_embeddings().weight
    names = {n for n, p in model.backbone.named_parameters() if p is w}
    touched = {k[len("backbone."):] if k.startswith("backbone.") else k for d in directions.values() for k in d}
    return None if names & touched else w


def _gather_lp(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]


def _chunk_terms(z0, js, hs, y, combos, want_rem, rho_tok=None, W=None):
    """Per scored token of one chunk (float64): log-likelihood derivatives, predicted log-probabilities and
    squared norms of each combination's logit terms; with ``rho_tok`` (per token, per combination) the
    remainders instead."""
    if W is not None:  # hidden states and their derivatives -> logits (the head is linear and fixed)
        Wt = W.T.to(z0.dtype)
        z0, js, hs = z0 @ Wt, {d: j @ Wt for d, j in js.items()}, {d: h @ Wt for d, h in hs.items()}
    z0 = z0.double()
    out: dict = {}
    if rho_tok is None:
        lp0 = torch.log_softmax(z0, -1)
        p0 = lp0.exp()
        out["f0"] = lp0.gather(-1, y[:, None])[:, 0]
        for d, j in js.items():
            j = j.double()
            pj = (p0 * j).sum(-1)
            out[("first", d)] = j.gather(-1, y[:, None])[:, 0] - pj
            if d in hs:
                h = hs[d].double()
                var = (p0 * j * j).sum(-1) - pj * pj
                out[("half", d)] = 0.5 * (h.gather(-1, y[:, None])[:, 0] - (p0 * h).sum(-1) - var)
    for c, coefs in combos.items():
        jc = sum(a * js[d].double() for d, a in coefs.items())
        second = all(d in hs for d in coefs)
        hc = sum(a * a * 0.5 * hs[d].double() for d, a in coefs.items()) if second else None
        if rho_tok is None:
            out[("lp1", c)] = _gather_lp(z0 + jc, y)
            out[("lp2", c)] = _gather_lp(z0 + jc + hc, y) if second else out[("lp1", c)]
            out[("nj", c)] = (jc * jc).sum(-1)
            out[("nh", c)] = (hc * hc).sum(-1) if second else torch.zeros_like(out[("lp1", c)])
        elif c in want_rem and second:
            z2 = z0 + jc + hc
            lp2 = _gather_lp(z2, y)
            r = rho_tok[c][:, None] * hc
            out[("rem+", c)] = _gather_lp(z2 + r, y) - lp2
            out[("rem-", c)] = _gather_lp(z2 - r, y) - lp2
    return out


def _scatter(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64).index_add_(0, rows, values.double().cpu())


def _second(model, batch, delta, max_memory) -> torch.Tensor:
    """D²[Δ, Δ] of the outputs on ``batch`` by nested JVPs, in chunks of examples sized by the memory plan of
    one direction (halved: the nested JVP carries two tangents)."""
    from .linearize import _rows, jvp_plan

    rows = max(1, jvp_plan(model, batch, [delta], max_memory, "token_logits").examples // 2)
    n = batch["input_ids"].shape[0]
    return torch.cat([jvp_batch(model, _rows(batch, e, e + rows), delta, second_order=True,
                                output="token_logits")[2] for e in range(0, n, rows)])


def lm_expansions(model, batches, directions: dict[str, dict[str, torch.Tensor]],
                  combinations: dict[str, dict[str, float]], second_order: list[str] | bool = True,
                  remainders=None, max_memory=None, device=None) -> tuple[LoglikDerivatives, LogitPredictions]:
    """One pass over the LM ``batches``: the log-likelihood derivatives of :func:`loglik_derivatives` and the
    predictions of the linearised logits (:class:`LogitPredictions`) for every combination
    ``{name: {direction: coefficient}}`` (e.g. ``{"sum": 0.5}`` for task arithmetic at λ = 0.5).

    First order: one batched JVP of the next-token logits per batch over all directions (``output=
    "token_logits"`` of :func:`taskvec.linearize.jvp_many`, within ``max_memory``); second order: a nested JVP
    per direction in ``second_order``. When no direction changes the LM head (:func:`head_weight`), the JVPs are
    of the final hidden states (:class:`FeatureModel`, ``(M, H)`` per direction) and the logits follow chunk by
    chunk as ``h·Wᵀ``; otherwise of the logits themselves (``(M, V)``). Only scored tokens are kept, and the
    per-token work runs in float64 chunks of :data:`TOKEN_CHUNK` tokens. ``remainders``: combinations
    whose :attr:`LogitPredictions.remainder` is computed (default all).
    """
    if not directions:
        raise TaskvecError("lm_expansions needs at least one direction")
    want2 = list(directions) if second_order is True else list(second_order or [])
    bad = [d for d in want2 if d not in directions]
    bad += [d for co in combinations.values() for d in co if d not in directions]
    if bad:
        raise TaskvecError(f"unknown directions {sorted(set(bad))}; directions: {list(directions)}")
    want_rem = set(combinations if remainders is None else remainders)
    W = head_weight(model, directions)
    fmodel = model if W is None else FeatureModel(model)
    if W is not None:
        W = W.detach()
    acc: dict = {}
    counts = []
    for b in _batches_on(batches, device):
        keep = b["labels"] != -100
        n = keep.shape[0]
        rows, y = keep.nonzero()[:, 0].cpu(), b["labels"][keep]
        z0, jl = jvp_many(fmodel, b, list(directions.values()), max_memory=max_memory, output="token_logits")
        z0, js = z0[keep], {d: j[keep] for d, j in zip(directions, jl)}
        del jl
        hs = {d: _second(fmodel, b, directions[d], max_memory)[keep] for d in want2}
        sums: dict = {}
        for s in range(0, len(y), TOKEN_CHUNK):
            sl = slice(s, s + TOKEN_CHUNK)
            terms = _chunk_terms(z0[sl], {d: j[sl] for d, j in js.items()}, {d: h[sl] for d, h in hs.items()},
                                 y[sl], combinations, want_rem, W=W)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + _scatter(v, rows[sl], n)
        rho = {c: (sums[("nh", c)].sqrt() / sums[("nj", c)].sqrt().clamp_min(1e-300)) for c in combinations}
        for s in range(0, len(y), TOKEN_CHUNK):
            sl = slice(s, s + TOKEN_CHUNK)
            rt = {c: rho[c][rows[sl]].to(z0.device) for c in combinations}
            terms = _chunk_terms(z0[sl], {d: j[sl] for d, j in js.items()}, {d: h[sl] for d, h in hs.items()},
                                 y[sl], combinations, want_rem, rt, W)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + _scatter(v, rows[sl], n)
        for k, v in sums.items():
            acc.setdefault(k, []).append(v)
        counts.append(keep.sum(1).cpu())
    cat = {k: torch.cat(v) for k, v in acc.items()}
    der = LoglikDerivatives(cat["f0"], torch.cat(counts), {d: cat[("first", d)] for d in directions},
                            {d: cat[("half", d)] for d in want2})
    pred = LogitPredictions()
    for c, coefs in combinations.items():
        pred.predicted[c], pred.predicted_1st[c] = cat[("lp2", c)], cat[("lp1", c)]
        pred.second[c] = all(d in want2 for d in coefs)
        nj, nh = float(cat[("nj", c)].sum()), float(cat[("nh", c)].sum())
        pred.curvature[c] = (nh ** 0.5 / nj ** 0.5 if nj > 0 else float("inf")) if pred.second[c] else float("inf")
        if ("rem+", c) in cat:
            pred.remainder[c] = torch.maximum(cat[("rem+", c)].abs(), cat[("rem-", c)].abs())
    return der, pred


def logit_trust_band(pred: LogitPredictions, combination: str, f0: torch.Tensor, n_tokens: torch.Tensor,
                     max_uncertainty: float = 0.05) -> dict:
    """The trust band of one combination's predicted mean-NLL change from the linearised logits, keys as
    :func:`trust_band_nats`: uncertainty Σ remainder_i / Σ n_i nats per token (∞ without a remainder),
    trusted when ρ < 1 and the uncertainty is at most ``max_uncertainty``."""
    rho = pred.curvature[combination]
    rem = pred.remainder.get(combination)
    unc = float(rem.sum()) / int(n_tokens.sum()) if rem is not None and rho != float("inf") else float("inf")
    return {"curvature": rho, "uncertainty": unc, "trusted": bool(rho < 1 and unc <= max_uncertainty),
            "predicted_change": mean_nll_change(pred.predicted[combination] - f0, n_tokens),
            "predicted_change_1st": mean_nll_change(pred.predicted_1st[combination] - f0, n_tokens)}
