"""``taskvec finetune --early-stopping spectral``: the RWY stopping rule of :mod:`taskvec.spectral` as a
:class:`~taskvec.stopping.StoppingRule` (the eNTK at θ0 on a training subsample, σ and R² estimated, the
predicted step, its log). Re-exported by :mod:`taskvec.spectral`."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .modelfn import as_batch, eval_mode
from .spectral import (SpectralError, _eig, adam_path_steps, cumulative_steps, estimate_sigma,
                       rkhs_norm_sq, softmax_curvature, spectral_stopping_step)
from .stopping import StopDecision, StoppingRule, TrainContext


# --- the stopping rule ---------------------------------------------------------------------------------------


@dataclass
class SpectralSummary:
    """What :class:`SpectralStopping` logs (JSON)."""

    rule: str = "spectral"
    predicted_step: int | None = None
    predicted_eta: float | None = None
    beyond_budget: bool = False
    stopped_at: int | None = None
    sigma: float | None = None
    R2: float | None = None
    R2_all: dict = field(default_factory=dict)
    critical_radius: float | None = None
    bound_scale: float | None = None
    n_train: int | None = None
    n_kernel: int | None = None
    num_outputs: int | None = None
    kernel: str | None = None
    r2: str | None = None
    loss: str | None = None
    loss_scale: float | None = None
    optimizer: str | None = None
    adam_mapping: str | None = None
    adam_kappa: float | None = None
    adam_signal_share: float | None = None
    eta_scale: float = 1.0
    eigen_top: list = field(default_factory=list)
    predicted_step_by_choice: dict = field(default_factory=dict)
    seconds: float | None = None
    kernel_cache: str | None = None
    notes: list = field(default_factory=list)


class SpectralStopping(StoppingRule):
    """``--early-stopping spectral``: stop at the RWY step predicted at θ0.

    Args (all optional; CLI ``--rule-arg spectral.KEY=VALUE``):
        max_examples: kernel subsample size m (default 512; CPU start-up stays in seconds-to-minutes).
        params: parameter selection for the kernel (default: the trained selection from the context, else
            ``"qkv"``).
        kernel: ``"full"`` (default) or ``"trace"``.
        r2: ``"pinv"`` (default) | ``"truncated"`` | ``"ridge"``; rcond, trunc: their thresholds.
        sigma: fixed noise level (default: estimated by CV kernel ridge).
        adam_mapping: ``"path"`` (default) | ``"init"`` | ``"lr"``; adam_batches: mini-batches measured at θ0;
            beta2, adam_eps: the optimiser's values (defaults as torch.optim.AdamW).
        eta_scale: multiply every η by this (1.0 = the linearised model; THEORY.md measured the real network
            fitting 1.4–2.2× faster per unit η, i.e. eta_scale≈1.8 would model that).
        mode: kernel mode ``"exact"`` (default) or ``"sketch"`` (with ``sketch_dim``).
        action: ``"stop"`` (default) or ``"log"`` (only log the prediction; never stops).
        seed: subsample/CV seed. chunk_size: NTK chunk size.
        cache_dir: folder for the θ0 kernel (default: none). The key hashes the subsample's tokens, the
            model's outputs on them at θ0 (float64 bytes: a different backbone or head misses), the parameter
            selection and the kernel mode, so runs that differ only in optimiser or learning rate share one
            kernel. ``summary()["kernel_cache"]`` says ``"hit"`` or ``"miss"``.
    """

    name = "spectral"

    def __init__(self, max_examples: int = 512, params=None, kernel: str = "full", r2: str = "pinv",
                 rcond: float = 1e-7, trunc: float = 1e-3, sigma: float | None = None,
                 adam_mapping: str = "path", adam_batches: int = 8, beta2: float = 0.999,
                 adam_eps: float = 1e-8, eta_scale: float = 1.0, mode: str = "exact", sketch_dim: int = 4096,
                 action: str = "stop", seed: int = 0, chunk_size: int | None = None,
                 cache_dir: str | None = None):
        if kernel not in ("full", "trace"):
            raise SpectralError(f"kernel must be 'full' or 'trace', got {kernel!r}")
        if r2 not in ("pinv", "truncated", "ridge"):
            raise SpectralError(f"r2 must be pinv, truncated or ridge, got {r2!r}")
        if adam_mapping not in ("path", "init", "lr"):
            raise SpectralError(f"adam_mapping must be path, init or lr, got {adam_mapping!r}")
        if action not in ("stop", "log"):
            raise SpectralError(f"action must be 'stop' or 'log', got {action!r}")
        self.max_examples, self.params, self.kernel, self.r2 = int(max_examples), params, kernel, r2
        self.rcond, self.trunc = float(rcond), float(trunc)
        self.sigma = None if sigma in (None, "", "none") else float(sigma)
        self.adam_mapping, self.adam_batches = adam_mapping, int(adam_batches)
        self.beta2, self.adam_eps, self.eta_scale = float(beta2), float(adam_eps), float(eta_scale)
        self.mode, self.sketch_dim, self.action = mode, int(sketch_dim), action
        self.seed, self.chunk_size = int(seed), None if chunk_size in (None, "", "none") else int(chunk_size)
        self.cache_dir = None if cache_dir in (None, "", "none") else Path(cache_dir)
        self.info = SpectralSummary()
        self.predicted: int | None = None

    # -- start: everything at θ0 --
    def start(self, ctx: TrainContext) -> None:
        if self.predicted is not None:  # resumed run: prediction restored from state
            return
        t0 = time.perf_counter()
        model = ctx.model
        sels = self._selections(ctx)
        sub, n_all = self._subsample(ctx)
        m = sub["input_ids"].shape[0]
        n = int(ctx.num_train or n_all)
        f0 = self._theta0_logits(model, sub)
        o = f0.shape[1]
        Y = torch.nn.functional.one_hot(sub["labels"].long(), o).double()
        if ctx.loss == "ce":
            resid = Y - torch.softmax(f0, -1)
            loss_scale = softmax_curvature(f0)
        else:
            resid = Y - f0
            loss_scale = 1.0
        K4, cache = self._theta0_kernel(model, sub, f0, sels)
        lam, lam_path, coef, r2s, sig, ridge = self._spectrum(K4, resid)
        R2 = r2s[self.r2]["R2"]
        sigma = sig["sigma"]
        opt = (ctx.optimizer or "sgd").lower()
        alphas, kappa, share = self._step_sizes(ctx, model, sels, opt, loss_scale, lam_path, coef)
        eta = cumulative_steps(alphas * self.eta_scale)
        pred = spectral_stopping_step(lam, eta, sigma, math.sqrt(max(R2, 1e-300)), n=n, cumulative=True)
        by_choice = {}
        for h, v in r2s.items():
            if v["R2"] > 0:
                by_choice[f"r2={h}"] = spectral_stopping_step(lam, eta, sigma, math.sqrt(v["R2"]), n=n,
                                                              cumulative=True).step
        self.predicted = pred.step
        self.info = SpectralSummary(
            predicted_step=pred.step, predicted_eta=pred.eta, beyond_budget=pred.step is None, sigma=sigma,
            R2=R2, R2_all={h: v for h, v in r2s.items()}, critical_radius=pred.critical_radius,
            bound_scale=pred.bound_scale, n_train=n, n_kernel=m, num_outputs=o, kernel=self.kernel, r2=self.r2,
            loss=ctx.loss, loss_scale=loss_scale, optimizer=opt,
            adam_mapping=None if opt == "sgd" else self.adam_mapping, adam_kappa=kappa,
            adam_signal_share=share, eta_scale=self.eta_scale, eigen_top=[float(x) for x in lam[:20]],
            predicted_step_by_choice=by_choice, seconds=time.perf_counter() - t0, kernel_cache=cache,
            notes=([f"kernel on a random subsample of {m} of {n} training examples; sums use n = {n}"]
                   if m < n else []) + ([f"sigma fixed by the user: {self.sigma}"] if self.sigma is not None
                                        else [f"sigma from 5-fold CV kernel ridge (ridge {ridge:g})"]))

    def _subsample(self, ctx) -> tuple[dict, int]:
        """The seeded kernel subsample (at most ``max_examples`` training examples, in order) and the number
        of training examples it was drawn from."""
        batch = as_batch(list(ctx.train_batches()))
        n_all = batch["input_ids"].shape[0]
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n_all, generator=g)[: self.max_examples].sort().values
        return {k: v[idx] for k, v in batch.items()}, n_all

    @staticmethod
    def _theta0_logits(model, sub: dict) -> torch.Tensor:
        """``(m, o)`` float64 logits at θ0 (eval mode, batches of 64), on the CPU."""
        dev = next(model.parameters()).device
        m = sub["input_ids"].shape[0]
        logits = []
        with torch.no_grad(), eval_mode(model):
            for a in range(0, m, 64):
                s = {k: v[a:a + 64].to(dev) for k, v in sub.items()}
                logits.append(model(s["input_ids"], s["attention_mask"], s.get("token_type_ids")).double().cpu())
        return torch.cat(logits)

    def _theta0_kernel(self, model, sub: dict, f0: torch.Tensor, sels) -> tuple[torch.Tensor, str | None]:
        """The full θ0 kernel ``(m, m, o, o)``, from ``cache_dir`` when there (``"hit"``), else computed (and
        cached: ``"miss"``; no cache: None)."""
        from .ntk import empirical_ntk

        key = self._cache_key(sub, f0, sels)
        path = None if self.cache_dir is None else self.cache_dir / f"spectral-kernel-{key}.safetensors"
        if path is not None and path.exists():
            from safetensors.torch import load_file

            return load_file(str(path))["kernel"], "hit"
        res = empirical_ntk(model, sub, params=sels, output="logits", kernel="full", mode=self.mode,
                            groups=False, sketch_dim=self.sketch_dim, seed=self.seed, chunk_size=self.chunk_size)
        K4 = res.kernel
        if path is None:
            return K4, None
        from safetensors.torch import save_file

        from .io import atomic_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"kernel": K4.contiguous()}, str(tmp), metadata={"key": key})
        return K4, "miss"

    def _spectrum(self, K4: torch.Tensor, resid: torch.Tensor):
        """``(λ̂ for the rule, λ̂ along the path, residual coefficients, R² by choice, σ estimate, ridge)``
        from the θ0 kernel and residual, for ``kernel`` = full or trace."""
        m, o = resid.shape
        Kfull = K4.permute(0, 2, 1, 3).reshape(m * o, m * o)  # (m·o, m·o), example-major
        Ktr = torch.diagonal(K4, dim1=2, dim2=3).mean(-1)
        sig = ({"sigma": self.sigma, "ridge": None, "cv_mse": None} if self.sigma is not None
               else estimate_sigma(Ktr, resid.numpy(), seed=self.seed))
        ridge = sig["ridge"]
        if ridge is None:
            ridge = estimate_sigma(Ktr, resid.numpy(), seed=self.seed)["ridge"]
        if self.kernel == "full":
            lam = torch.linalg.eigvalsh(0.5 * (Kfull + Kfull.T) / m).flip(0).numpy()
            r2s = {h: rkhs_norm_sq(Kfull, resid.reshape(-1).numpy(), h, self.rcond, self.trunc, ridge)
                   for h in ("pinv", "truncated", "ridge")}
            lam_path, U = _eig(Kfull / m)
            coef = U.T @ resid.reshape(-1).numpy()
        else:
            lt, Ut = _eig(Ktr / m)
            lam = np.repeat(lt, o)
            r2s = {}
            for h in ("pinv", "truncated", "ridge"):
                parts = [rkhs_norm_sq(Ktr, resid[:, a].numpy(), h, self.rcond, self.trunc, ridge) for a in range(o)]
                r2s[h] = {"R2": sum(p["R2"] for p in parts), "how": h,
                          "share_below_1e-3": float(np.mean([p["share_below_1e-3"] for p in parts]))}
            coef = (Ut.T @ resid.numpy()).T.reshape(-1)  # output-major: (output a, mode i)
            lam_path = np.tile(lt, o)
        return lam, lam_path, coef, r2s, sig, ridge

    def _step_sizes(self, ctx, model, sels, opt: str, loss_scale: float, lam_path, coef):
        """``(α_k per step before eta_scale, κ, signal share)`` for the optimiser (see ``adam_mapping``)."""
        lrs = np.array([float(ctx.lr_at(k)) for k in range(ctx.max_steps)])
        kappa = share = None
        if opt == "sgd" or self.adam_mapping == "lr":
            return lrs * loss_scale, kappa, share
        kappa, share = self._adam_stats(ctx, model, sels)
        if self.adam_mapping == "init":
            return lrs * loss_scale * kappa, kappa, share
        return adam_path_steps(lrs, lam_path, coef, kappa, share, self.beta2, loss_scale), kappa, share

    def _cache_key(self, sub: dict, f0: torch.Tensor, sels) -> str:
        """Hash of what the θ0 kernel depends on (see ``cache_dir``)."""
        h = hashlib.sha256()
        for k in sorted(sub):
            if k != "labels":
                h.update(k.encode())
                h.update(sub[k].contiguous().numpy().tobytes())
        h.update(f0.contiguous().numpy().tobytes())
        h.update(repr([(s.name, s.shape, s.dim, s.ranges) if hasattr(s, "ranges") else s for s in sels]).encode())
        h.update(f"{self.mode}|{self.sketch_dim if self.mode == 'sketch' else ''}|"
                 f"{self.seed if self.mode == 'sketch' else ''}".encode())
        return h.hexdigest()[:24]

    def _selections(self, ctx):
        from .ntk import select_params
        from .scopes import ParamSelection

        if self.params is not None:
            return select_params(ctx.model, self.params)
        sel = list(ctx.selections or [])
        if sel and all(isinstance(s, ParamSelection) for s in sel):
            return sel
        if sel and all(isinstance(s, str) for s in sel):
            return select_params(ctx.model, sel)
        return select_params(ctx.model, "qkv")

    def _adam_stats(self, ctx, model, sels) -> tuple[float, float]:
        """κ and the signal share w from ``adam_batches`` mini-batch gradients at θ0 (module docstring)."""
        named = dict(model.named_parameters())
        names = list(dict.fromkeys(s.name for s in sels))
        masks = {}
        for s in sels:
            mk = s.mask(named[s.name].device)
            masks[s.name] = masks[s.name] | mk if s.name in masks else mk
        ps = [named[nm] for nm in names]
        req = [p.requires_grad for p in ps]
        dev = ps[0].device
        batch = as_batch(list(ctx.train_batches()))
        n = batch["input_ids"].shape[0]
        B = max(1, int(ctx.batch_size))
        g = torch.Generator().manual_seed(self.seed + 1)
        grads = []
        with eval_mode(model):  # dropout off: the kernel is taken without dropout too
            try:
                for p in ps:
                    p.requires_grad_(True)
                for _ in range(max(2, self.adam_batches)):
                    idx = torch.randperm(n, generator=g)[:B]
                    s = {k: v[idx].to(dev) for k, v in batch.items()}
                    with torch.enable_grad():
                        logits = model(s["input_ids"], s["attention_mask"], s.get("token_type_ids"))
                        y = s["labels"].long()
                        if ctx.loss == "ce":
                            loss = torch.nn.functional.cross_entropy(logits.float(), y)
                        else:
                            oh = torch.nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)
                            loss = 0.5 * ((logits - oh) ** 2).sum(-1).mean()
                        gs = torch.autograd.grad(loss, ps, allow_unused=True)
                    flat = torch.cat([(gg if gg is not None else torch.zeros_like(p))[masks[nm]].double().reshape(-1)
                                      for gg, p, nm in zip(gs, ps, names)])
                    grads.append(flat)
            finally:
                for p, r in zip(ps, req):
                    p.requires_grad_(r)
        G = torch.stack(grads)  # (M, p)
        gbar = G.mean(0)
        v = (G * G).mean(0)
        num = float((gbar * gbar / (v.sqrt() + self.adam_eps)).sum())
        den = float((gbar * gbar).sum())
        kappa = num / den if den > 0 else 0.0
        share = float(den / (G * G).sum(1).mean()) if float((G * G).sum()) > 0 else 1.0
        return kappa, share

    def update(self, step: int, metrics: dict | None) -> StopDecision | None:
        if self.action == "stop" and self.predicted is not None and step >= max(self.predicted, 1) \
                and self.info.stopped_at is None:
            self.info.stopped_at = step
            return StopDecision(f"spectral: predicted stopping step {self.predicted} (η = "
                                f"{self.info.predicted_eta:.4g}, σ = {self.info.sigma:.3g}, R² = {self.info.R2:.4g})",
                                step, step)
        return None

    def eval_steps(self) -> list[int]:
        """The predicted step, so that the learning curve has a measured point exactly there."""
        return [self.predicted] if self.predicted else []

    def summary(self) -> dict:
        return asdict(self.info)

    def state_dict(self) -> dict:
        return {"predicted": self.predicted, "info": asdict(self.info)}

    def load_state_dict(self, state: dict) -> None:
        self.predicted = state.get("predicted")
        if state.get("info"):
            self.info = SpectralSummary(**state["info"])
