"""What every validation phase works on: the run's θ0 task models around one shared backbone, the
evaluation and kernel batches, the task vectors, and a counter of full evaluations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import TaskvecError
from ..linearize import forward_outputs
from ..runs import Run
from .costs import Ledger


def add_deltas(a: dict, b: dict, cb: float = 1.0) -> dict:
    """``a + cb·b`` over the union of tensor names."""
    out = {k: v.clone() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] + cb * v if k in out else cb * v
    return out


def scale_deltas(a: dict, c: float) -> dict:
    return {k: c * v for k, v in a.items()}


class SharedBackbone:
    """One backbone shared by every task model, whose scope tensors can be set to θ0 + Δ and restored
    exactly (``set(None)``)."""

    def __init__(self, backbone, names):
        self.bb = backbone
        self.params = dict(backbone.named_parameters())
        missing = [k for k in names if k not in self.params]
        if missing:
            raise TaskvecError(f"task vectors name tensors the base model does not have: {missing[:5]}")
        self.orig = {k: self.params[k].detach().clone() for k in names}

    @torch.no_grad()
    def set(self, delta: dict | None):
        for k, v in self.orig.items():
            self.params[k].copy_(v)
        for k, d in (delta or {}).items():
            self.params[k].add_(d.to(self.params[k].device, self.params[k].dtype))


@dataclass
class Context:
    """In-memory inputs of a validation (built by :func:`load_context`; nothing here is saved).

    ``models[t]``: θ0 task model of task t (the shared backbone + t's head); ``eval_batches[t]`` its seeded
    test subset, ``kernel_batches[t]`` its seeded training subset (eNTK inputs); ``keys``: the tensors the
    task vectors change; ``base_state``: their θ0 values (CPU).
    """

    run: Run
    names: list[str]
    device: torch.device
    vectors: dict
    models: dict
    eval_batches: dict
    kernel_batches: dict
    keys: list[str]
    shared: SharedBackbone
    base_state: dict
    evaluations: int = 0
    sum_tau: dict = field(default_factory=dict)
    holdout_batches: dict = field(default_factory=dict)  # {task: Batches} disjoint from eval_batches (tasks with any)
    holdout_evaluations: int = 0
    ledger: Ledger | None = None  # compute spent per phase (costs.py); made by load_context
    probe_batches: dict = field(default_factory=dict)  # {task: Batches} of the probe examples (may be {})
    probe_pos: dict = field(default_factory=dict)  # {task: (k,) positions of the probe rows in the eval outputs}

    def combination(self, coefs: dict[str, float]) -> dict:
        """Δ = Σ_t c_t·τ_t (float32, every tensor of :attr:`keys`) for ``coefs`` = ``{task: c_t}``."""
        return {k: sum(float(c) * self.vectors[t].deltas[k].float() for t, c in coefs.items()
                       if k in self.vectors[t].deltas) for k in self.keys}

    def measure_probe(self, delta: dict | None, tasks) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{s: (positions (k,), logits (k, o))}`` of the merged model θ0 + ``delta`` on the probe examples of
        each task s of ``tasks`` (:mod:`~taskvec.validation.probe`); counted as the ``probes`` phase."""
        import contextlib

        tasks = [s for s in tasks if s in self.probe_batches]
        if not tasks:
            return {}
        with self.ledger.phase("probes") if self.ledger is not None else contextlib.nullcontext():
            self.shared.set(delta)
            res = {s: (self.probe_pos[s], forward_outputs(self.models[s], self.probe_batches[s], self.device)[0].float())
                   for s in tasks}
            self.shared.set(None)
            if self.ledger is not None:
                self.ledger.add("forward", sum(len(self.probe_batches[s].indices) for s in tasks))
        return res

    def measure(self, delta: dict | None, holdout: bool = False, tasks=None) -> dict[str, torch.Tensor]:
        """Logits ``(n_s, o_s)`` of every task s (or of ``tasks``) on its evaluation subset — or on its held-out
        subset — at θ0 + ``delta`` (one full evaluation, counted in :attr:`evaluations` /
        :attr:`holdout_evaluations`)."""
        import time

        batches = self.holdout_batches if holdout else self.eval_batches
        tasks = list(tasks or [s for s in self.names if s in batches])
        tick = time.perf_counter()
        self.shared.set(delta)
        res = {s: forward_outputs(self.models[s], batches[s], self.device)[0].float() for s in tasks}
        self.shared.set(None)
        if self.ledger is not None:
            self.ledger.add("forward", sum(len(batches[s].indices) for s in tasks))
            if not holdout and len(tasks) == len(self.names):
                self.ledger.measure_seconds.append(time.perf_counter() - tick)
        if holdout:
            self.holdout_evaluations += 1
        else:
            self.evaluations += 1
        return res


def probe_subset(run: Run, name: str, batches, k: int, seed: int = 0):
    """``(positions (k,), Batches)``: k random examples of the evaluation ``batches`` of task ``name``
    (:func:`~taskvec.validation.probe.probe_positions`), positions into the rows of the evaluation outputs
    (their length-sorted iteration order), in the row order of the returned batches."""
    from .probe import probe_positions

    rows = [batches.indices[j] for j in batches.order(0)]  # dataset index of each output row
    pos = probe_positions(len(rows), k, seed)
    pb = run.batches(name, [rows[int(p)] for p in pos], sort_by_length=True)
    return pos[torch.tensor(pb.order(0), dtype=torch.long)], pb


def load_context(run: Run, n_eval: int, n_kernel: int, device, n_holdout: int = 0, n_probe: int = 0) -> Context:
    """θ0 task models, batches and task vectors of ``run`` for validation (see :class:`Context`);
    ``n_holdout`` test examples per task beyond the evaluation subset for the held-out checks (0: none);
    ``n_probe`` of each task's evaluation examples as its probe (:mod:`~taskvec.validation.probe`; 0: none)."""
    names = run.names
    if len(names) < 2:
        raise TaskvecError(f"{run.root}: validation needs at least two tasks, found {names}")
    vectors = run.vectors(names)
    bb = run.backbone(device)
    keys = sorted(set().union(*[v.deltas for v in vectors.values()]))
    shared = SharedBackbone(bb, keys)
    base_state = {k: shared.orig[k].cpu() for k in keys}
    models = {t: run.base_task_model(t, backbone=bb).to(device) for t in names}
    eval_batches = {t: run.eval_batches(t, n_eval) for t in names}
    kernel_batches = {t: run.kernel_batches(t, n_kernel) for t in names}
    tvs = [vectors[t] for t in names]
    sum_tau = {k: sum(v.deltas[k].float() for v in tvs if k in v.deltas) for k in keys}
    holdout = {}
    if n_holdout:  # a task whose test split is no larger than its evaluation subset has nothing to hold out
        idx = {t: run.holdout(t, n_eval, n_holdout) for t in names}
        holdout = {t: run.batches(t, idx[t], sort_by_length=True) for t in names if idx[t]}
    probes = {t: probe_subset(run, t, eval_batches[t], n_probe) for t in names} if n_probe else {}
    return Context(run, names, device, vectors, models, eval_batches, kernel_batches, keys, shared, base_state,
                   sum_tau=sum_tau, holdout_batches=holdout,
                   ledger=Ledger(sum(len(b.indices) for b in eval_batches.values())),
                   probe_batches={t: p[1] for t, p in probes.items()}, probe_pos={t: p[0] for t, p in probes.items()})


def kernel_scope(run: Run, keys: list[str]) -> str:
    """The eNTK's parameter selection (:meth:`Run.kernel_params`): the run's scope, or exactly the tensors the
    task vectors change (LoRA runs, studies)."""
    return run.kernel_params(keys)
