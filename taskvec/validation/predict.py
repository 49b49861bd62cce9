"""Phase 2: directional derivatives of every task's outputs at θ0 along every merge direction, and the
predictions (with their trust band) built from them.

Task-arithmetic merges θ0 + Σ_t α_t τ_t are linear in the α's to first order, so J·τ_t per task predicts
every coefficient setting; the second-order term along Σ τ (float64 central differences) scales with λ².
Other methods (TIES, TSV, the NTK-aware merges) cost their own direction. With the second order everything
comes from one float64 copy of each task model: f(θ0), one forward per τ_t (one-sided difference: J·τ_t)
and two per other direction (central: J·Δ and D²f[Δ, Δ]); first order only, from one batched float32 JVP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import TaskvecError
from ..interference import trust_band
from ..linearize import Directional, accuracy, directional_outputs, relative_linearisation_error
from .context import Context
from .probe import probe_prediction


@dataclass
class Derivatives:
    """Result of :func:`derivative_phase` (in memory).

    ``D[s]``: task s's :class:`~taskvec.linearize.Directional` on its evaluation subset — ``f0`` ``(n, o)``,
    ``labels``, ``jvps[d]`` = J·Δ_d and ``hvps[d]`` = ½·D²f[Δ_d, Δ_d] (both ``(n, o)``) for the directions
    ``tau:<t>`` (first order only), ``sum`` (Σ τ) and every other merge's own direction.
    """

    names: list[str]
    D: dict[str, Directional]
    second_order: bool
    seconds: float = 0.0

    def ta_terms(self, coefs: dict[str, float]) -> tuple[dict, dict | None]:
        """J·Δ and ½·D²f[Δ, Δ] of θ0 + Σ_t c_t τ_t per task: first order exact in every coefficient; the
        second-order term is ½·c̄²·D²f[Στ, Στ] (c̄ = mean coefficient: exact for a global λ, the
        along-the-sum approximation for per-task coefficients)."""
        first = {s: sum(c * self.D[s].jvps[f"tau:{t}"] for t, c in coefs.items()) for s in self.names}
        if not (self.second_order and "sum" in self.D[self.names[0]].hvps):
            return first, None
        cbar = float(np.mean(list(coefs.values())))
        return first, {s: 0.5 * cbar ** 2 * self.D[s].hvps["sum"] for s in self.names}

    def merge_terms(self, name: str, lam: float = 1.0) -> tuple[dict, dict | None]:
        """J·(λΔ) and ½·D²f[λΔ, λΔ] along a merge's own direction ``name``."""
        first = {s: lam * self.D[s].jvps[name] for s in self.names}
        has2 = name in self.D[self.names[0]].hvps
        half = {s: 0.5 * lam ** 2 * self.D[s].hvps[name] for s in self.names} if has2 else None
        return first, half


def derivative_phase(ctx: Context, second_dirs: dict[str, dict], second_order: bool = True,
                     progress: bool = True, max_memory=None, precision: str = "float64") -> Derivatives:
    """J·τ_t per task along every τ_t, and first + second order along each of ``second_dirs`` (``{name: Δ}``;
    ``sum`` = Σ τ and the non-task-arithmetic merges): finite differences in ``precision`` (``"float64"``, or
    ``"float32"``: half the cost, relative errors about 1e-3 of the terms; module docstring), or without
    ``second_order`` batched JVPs within ``max_memory`` (:func:`taskvec.linearize.jvp_many`)."""
    if precision not in ("float64", "float32"):
        raise TaskvecError(f"precision must be 'float64' or 'float32', got {precision!r}")
    fd_dtype = getattr(torch, precision)
    from tqdm.auto import tqdm

    tick = time.time()
    dir_specs = {f"tau:{t}": ctx.vectors[t].deltas for t in ctx.names}
    D: dict[str, Directional] = {}
    for s in tqdm(ctx.names, desc="linearised predictions", disable=not progress):
        if second_order:  # one float64 copy and f(θ0): central differences + one-sided ones along the τ's
            D[s] = directional_outputs(ctx.models[s], ctx.eval_batches[s], second_dirs, second_order=True,
                                       device=ctx.device, first_only=dir_specs, fd_dtype=fd_dtype)
        else:  # first order only: batched float32 JVPs
            D[s] = directional_outputs(ctx.models[s], ctx.eval_batches[s], {**dir_specs, **second_dirs},
                                       device=ctx.device, max_memory=max_memory)
        if ctx.ledger is not None:
            _count(ctx, s, len(dir_specs), len(second_dirs), second_order, precision)
    return Derivatives(list(ctx.names), D, second_order, time.time() - tick)


def _count(ctx: Context, s: str, n_tau: int, n_second: int, second_order: bool, precision: str = "float64") -> None:
    """What :func:`derivative_phase` spent on task ``s`` (see :mod:`~taskvec.validation.costs`): with the second
    order, the float32 f0 and float64 forwards — one at θ0, one per τ (one-sided), two per other direction
    (central); first order only, one batched JVP (a primal pass + a tangent per direction)."""
    n = len(ctx.eval_batches[s].indices)
    ctx.ledger.add("forward", n)
    if second_order:
        ctx.ledger.add("forward64" if precision == "float64" else "forward", n, 1 + n_tau + 2 * n_second)
    else:
        ctx.ledger.add("jvp_tangents", n, n_tau + n_second)


@dataclass
class Scorer:
    """Scores predictions against measurements, per task (see :meth:`record`).

    ``base_logits[s]`` ``(n, o)`` = f0, ``labels[s]`` ``(n,)``, ``base_acc`` / ``ft_acc``: accuracies (0–1) of
    θ0 and of the fine-tuned model on the same evaluation subset; ``max_uncertainty`` in accuracy points.
    """

    names: list[str]
    base_logits: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    base_acc: dict[str, float]
    ft_acc: dict[str, float] = field(default_factory=dict)
    max_uncertainty: float = 1.0
    probe_max_uncertainty: float = 3.0

    @classmethod
    def from_derivatives(cls, der: Derivatives, max_uncertainty: float, probe_max_uncertainty: float = 3.0) -> Scorer:
        D = der.D
        return cls(der.names, {s: D[s].f0 for s in der.names}, {s: D[s].labels for s in der.names},
                   {s: accuracy(D[s].f0, D[s].labels) for s in der.names}, max_uncertainty=max_uncertainty,
                   probe_max_uncertainty=probe_max_uncertainty)

    def entry(self, s: str, first: torch.Tensor, half_second: torch.Tensor | None, measured: torch.Tensor,
              probe: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Task s's prediction from J·Δ (and ½·D²f[Δ, Δ]) against its measured logits, with the trust band.

        Keys: ``base``, ``predicted_1st``, ``predicted_2nd``, ``predicted`` (the headline), ``measured``,
        ``finetuned`` (accuracies 0–1), ``lin_error`` / ``lin_error_2nd`` (relative linearisation errors),
        ``curvature``, ``uncertainty`` (points), ``trusted``, ``predictor``, ``normalized_*``.

        The headline is the Taylor expansion (second order when given) where its own band trusts it. Where
        it does not and a ``probe`` ``(positions (k,), merged logits (k, o))`` was measured (before this call,
        on k of the evaluation examples), the headline is the probe-calibrated prediction
        (:func:`~taskvec.validation.probe.probe_prediction`; J·Δ calibrated, and ½D²f too where its series
        converges, ρ < 1) with its own uncertainty, trusted up to ``probe_max_uncertainty`` points, and the
        Taylor numbers stay beside it as ``*_taylor`` — unless the series converges and the probe finds no
        bias in the expansion (|mean error on the probe| ≤ 2 se): then the (flagged) Taylor prediction stays
        the headline and the check is recorded as ``probe_check``.
        """
        f_true, f0, y = measured, self.base_logits[s], self.labels[s]
        p1 = f0 + first
        ft = self.ft_acc.get(s)
        e = {"base": self.base_acc[s], "predicted_1st": accuracy(p1, y), "measured": accuracy(f_true, y),
             "lin_error": relative_linearisation_error(f_true, f0, p1), "finetuned": ft, "predictor": "taylor"}
        if half_second is not None:
            p2 = p1 + half_second
            e["predicted_2nd"] = accuracy(p2, y)
            e["lin_error_2nd"] = relative_linearisation_error(f_true, f0, p2)
            e.update(trust_band(first, half_second, p2, self.max_uncertainty))
            e["predicted"] = e["predicted_2nd"]
        else:
            e.update({"curvature": None, "uncertainty": None, "trusted": False})
            e["predicted"] = e["predicted_1st"]
        # spread of the predicted per-example change (−1, 0, +1): the sampling error of an accuracy change
        pred = p1 + half_second if half_second is not None else p1
        d = (pred.argmax(-1) == y).float() - (f0.argmax(-1) == y).float()
        e["change_sd"] = float(d.std(unbiased=False))
        # the same spread of the measured changes: what the held-out check's sampling allowance uses
        dm = (f_true.argmax(-1) == y).float() - (f0.argmax(-1) == y).float()
        e["change_sd_measured"] = float(dm.std(unbiased=False))
        e["n"] = int(y.numel())
        if probe is not None and not e["trusted"]:
            self._probed(e, f0, first, half_second, y, *probe)
        e["normalized_measured"] = e["measured"] / ft if ft else None
        e["normalized_predicted"] = e["predicted"] / ft if ft else None
        return e

    def _probed(self, e: dict, f0, first, half_second, y, pos, f_probe) -> None:
        """A flagged entry ``e`` given a probe (see :meth:`entry`): the probe-calibrated headline, or the
        expansion kept where its series converges and the probe finds no bias in it."""
        converges = e["curvature"] is not None and e["curvature"] < 1
        pp = probe_prediction(f0, first, half_second if converges else None, y, pos, f_probe)
        check = {k: pp[k] for k in ("n_probe", "taylor_bias", "taylor_bias_se", "taylor_consistent")}
        if converges and check["taylor_consistent"]:
            e["probe_check"] = check
            return
        e.update({"predicted_taylor": e["predicted"], "uncertainty_taylor": e["uncertainty"],
                  "trusted_taylor": e["trusted"], "predictor": "probe", "predicted": pp["predicted"],
                  "uncertainty": pp["uncertainty"], "trusted": pp["uncertainty"] <= self.probe_max_uncertainty,
                  "probe": {k: pp[k] for k in ("n_probe", "alpha", "beta", "gamma", "probe_error_rate", "se")} | check})

    def flagged(self, first: dict, half_second: dict | None) -> list[str]:
        """The tasks whose Taylor prediction the trust band does not trust (known before merging)."""
        if half_second is None:
            return list(self.names)
        return [s for s in self.names if not trust_band(first[s], half_second[s], self.base_logits[s] + first[s]
                                                        + half_second[s], self.max_uncertainty)["trusted"]]

    def record(self, first: dict, half_second: dict | None, measured: dict, probes: dict | None = None) -> dict:
        """:meth:`entry` for every task: ``{task: entry}`` (``probes``: ``{task: (positions, logits)}``)."""
        return {s: self.entry(s, first[s], None if half_second is None else half_second[s], measured[s],
                              (probes or {}).get(s)) for s in self.names}

    def predicted_avg(self, first: dict, half_second: dict | None) -> float:
        """Predicted average normalised accuracy (no measurement)."""
        return float(np.mean([accuracy(self.base_logits[s] + first[s] + (half_second[s] if half_second else 0),
                                       self.labels[s]) / self.ft_acc[s] for s in self.names]))
