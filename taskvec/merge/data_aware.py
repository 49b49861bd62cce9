"""Data-aware merges: Fisher merging and RegMean, from statistics of each task's own data.

Definitions (``../shared/THEORY.md``, "Merge methods"):

* **Fisher** (Matena & Raffel 2022): per parameter entry, the diagonal Fisher of task t's fine-tuned model
  θ_t on its training examples, F_t = mean_x Σ_c p_t(c|x)·(∂ log p_t(c|x)/∂θ)² (the expectation over the
  model's own predictive distribution, not a sampled label); merged θ = Σ_t w_t·F̃_t·θ_t / Σ_t w_t·F̃_t with
  F̃_t = F_t/‖F_t‖ + ε (``normalize``: each task's Fisher divided by its L2 norm over all merged tensors, as
  FusionBench; ``floor`` ε = 1e-6). Where every F_t is zero this is the weighted mean. In terms of task
  vectors: Δ = Σ_t w_t·F̃_t·τ_t / Σ_t w_t·F̃_t.
* **NTK-aware** (``ntk_aware``, ``ntk_aware_harmful``; docs/validation.md, "Prediction-driven merging"):
  Δ = λ·Σ_t τ_t', each τ_t without its component in the other tasks' top-r eNTK eigenspaces (all of it, or
  only the part that raises their training loss), computed by validation's own eigenspace phase
  (:func:`taskvec.validation.eigen.eigenspace_phase` on :func:`taskvec.validation.context.load_context`).
* **RegMean** (Jin et al. 2023): per linear layer, G_t = X_tᵀX_t / #tokens of the layer's inputs in θ_t on
  task t's examples (padding excluded; float64), off-diagonal entries × α (default 0.9); with W as
  (d_in, d_out), W* = (Σ_t w_t G_t)⁻¹ Σ_t w_t G_t W_t, i.e. Δ = (Σ w_t G_t)⁻¹ Σ w_t G_t τ_t. Every other
  merged tensor (biases, norms, embeddings) is the weighted mean θ0 + Σ w_t τ_t / Σ w_t.

Per-example gradients come from the eNTK's engine (:class:`taskvec.ntk.engines._Jacobian` with
``output="logits"``: the batched engine for linear layers, ``vmap(jacrev)`` otherwise); layer inputs from
forward hooks on the layers (:func:`taskvec.ntk.engines._linear_layers` decides what is a plain linear map).

Layout: pure functions over tensors (:func:`fisher_delta`, :func:`regmean_delta`), the statistics of one
model on one batch list (:func:`fisher_statistics`, :func:`gram_statistics`), their orchestration over a
run's tasks (:func:`run_statistics`), and the two callers: the engine's tensor stream for ``taskvec merge``
(:func:`tensor_stream`, the hook) and the in-memory merge used by validation (:func:`merge_run_vectors`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .methods import WEIGHT, Method, MergeError, Param, _boolean, _integer, register

log = logging.getLogger(__name__)

NTK_AWARE = ("ntk_aware", "ntk_aware_harmful")
DATA_AWARE = ("fisher", "regmean", *NTK_AWARE)


def is_data_aware(method: str) -> bool:
    """Whether ``method`` needs statistics of each task's data (a ``run:`` to take them from)."""
    return method in DATA_AWARE


# --- pure functions over tensors ---------------------------------------------------------------------------


def fisher_delta(deltas: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float],
                 floor: float = 1e-6) -> torch.Tensor:
    """Fisher-weighted merge of one tensor: Δ = Σ_t w_t (F_t + ε) τ_t / Σ_t w_t (F_t + ε).

    Args:
        deltas: T task vectors τ_t of one tensor, shape ``S``.
        fishers: T diagonal Fishers of the same shape ``S`` (already normalised if wanted), ≥ 0.
        weights: T coefficients w_t.
        floor: ε added to every Fisher entry (where all F_t = 0 the result is the weighted mean).
    Returns:
        Δ of shape ``S`` in ``deltas[0]``'s dtype (computed in float64).
    """
    if not (len(deltas) == len(fishers) == len(weights)) or not deltas:
        raise MergeError(f"fisher: {len(deltas)} task vectors, {len(fishers)} Fishers and {len(weights)} weights")
    num = torch.zeros(deltas[0].shape, dtype=torch.float64, device=deltas[0].device)
    den = torch.zeros_like(num)
    for d, f, w in zip(deltas, fishers, weights):
        if f.shape != d.shape:
            raise MergeError(f"fisher: a Fisher of shape {tuple(f.shape)} for a tensor of shape {tuple(d.shape)}")
        wf = float(w) * (f.to(num) + floor)
        num += wf * d.to(num)
        den += wf
    return (num / den).to(deltas[0].dtype)


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·G + (1 − α)·diag(G)``: the off-diagonal entries of a square Gram matrix times α."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_delta(deltas: list[torch.Tensor], grams: list[torch.Tensor], weights: list[float],
                  alpha: float = 0.9, layout: str = "linear", name: str = "weight") -> torch.Tensor:
    """RegMean of one linear layer's weight: Δ = (Σ_t w_t G̃_t)⁻¹ Σ_t w_t G̃_t τ_t, W as (d_in, d_out).

    Args:
        deltas: T task vectors of the weight: ``(d_out, d_in)`` for ``layout="linear"`` (``nn.Linear``),
            ``(d_in, d_out)`` for ``"conv1d"`` (GPT-2's ``Conv1D``).
        grams: T Gram matrices ``(d_in, d_in)`` of the layer's inputs (X_tᵀX_t / #tokens).
        weights: T coefficients w_t. alpha: off-diagonal scale α ∈ [0, 1].
        name: the tensor's name, for errors.
    Returns:
        Δ in the layout and dtype of ``deltas[0]`` (solved in float64).
    """
    if not (len(deltas) == len(grams) == len(weights)) or not deltas:
        raise MergeError(f"regmean {name}: {len(deltas)} task vectors, {len(grams)} Grams and {len(weights)} weights")
    d_in = deltas[0].shape[1] if layout == "linear" else deltas[0].shape[0]
    lhs = torch.zeros((d_in, d_in), dtype=torch.float64, device=deltas[0].device)
    rhs = None
    for d, g, w in zip(deltas, grams, weights):
        if g.shape != (d_in, d_in):
            raise MergeError(f"regmean {name}: Gram of shape {tuple(g.shape)} for a weight with {d_in} inputs "
                             f"(shape {tuple(d.shape)}, layout {layout})")
        gw = float(w) * scale_off_diagonal(g.to(lhs), alpha)
        dt = d.to(lhs).T if layout == "linear" else d.to(lhs)  # (d_in, d_out)
        lhs += gw
        rhs = gw @ dt if rhs is None else rhs + gw @ dt
    sol, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        raise MergeError(f"regmean {name}: Σ G of the layer's inputs is singular (an input feature that is zero "
                         "on every example?); use alpha < 1 or more examples (n_examples)")
    return (sol.T if layout == "linear" else sol).to(deltas[0].dtype)


def mean_delta(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted mean Σ w_t τ_t / Σ w_t (RegMean's rule for tensors that are not linear weights)."""
    tot = float(sum(weights))
    if tot == 0:
        raise MergeError("regmean: the weights sum to zero")
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out.add_(d, alpha=float(w) / tot)
    return out


# --- statistics of one model on one task's examples --------------------------------------------------------


def _param_names(model: torch.nn.Module, keys) -> dict[str, str]:
    """``{key: model parameter name}``: ``key`` itself or with the one prefix (``backbone.``) that matches."""
    named = dict(model.named_parameters())
    out = {}
    for k in keys:
        full = k if k in named else next((n for n in named if n.endswith("." + k)), None)
        if full is None:
            raise MergeError(f"tensor {k!r} is not a parameter of the task model "
                             f"{type(model).__name__} (names look like {', '.join(list(named)[:3])})")
        out[k] = full
    return out


@torch.no_grad()
def fisher_statistics(model: torch.nn.Module, batches, keys, chunk_size: int | None = None) -> dict:
    """Diagonal Fisher of ``model`` on ``batches``: ``{key: F (param shape), float64}``.

    F = (1/n) Σ_x Σ_c p(c|x)·(∂ log p(c|x)/∂θ)², from the per-example Jacobian J of the logits (``(o, p)``
    per example): ∂ log p(c|x)/∂θ = J_c − Σ_c' p(c'|x) J_c'. ``keys`` are parameter names (with or without
    the task model's ``backbone.`` prefix).
    """
    from ..modelfn import as_batch, eval_mode, tf32_disabled
    from ..ntk.engines import _Jacobian
    from ..ntk.selection import select_params

    names = _param_names(model, keys)
    batch = as_batch(list(batches), next(model.parameters()).device)
    n = batch["input_ids"].shape[0]
    if n == 0:
        raise MergeError("fisher: no examples")
    p_total = sum(dict(model.named_parameters())[f].numel() for f in names.values())
    with tf32_disabled(), eval_mode(model):
        jf = _Jacobian(model, select_params(model, list(names.values())), "logits", 1)
        o = jf.num_outputs(batch)
        jf.chunk_size = chunk_size or max(1, min(32, int(2**26 // max(1, o * p_total))))
        probs = torch.cat([model(batch["input_ids"][a:a + 64], batch["attention_mask"][a:a + 64],
                                 batch["token_type_ids"][a:a + 64] if "token_type_ids" in batch else None)
                           for a in range(0, n, 64)]).double().softmax(-1)
        acc = {k: torch.zeros(dict(model.named_parameters())[f].shape, dtype=torch.float64) for k, f in names.items()}
        idx = torch.arange(n)
        jf.check_finite = False  # the result is checked once, below
        for pos, jac in jf.blocks(batch, idx, "fisher examples"):
            p = probs[idx[pos]].to(jac[names[next(iter(names))]].device)  # (b, o)
            for k, f in names.items():
                J = jac[f]  # (b, o, numel), float32: per-example squares in float32, summed over examples in float64
                pj = p.to(J.dtype)
                g = J - torch.einsum("bo,bop->bp", pj, J)[:, None]
                g.square_()
                acc[k] += torch.einsum("bo,bop->p", pj, g).view(acc[k].shape).to("cpu", torch.float64)
            del jac
    for k, v in acc.items():
        if not bool(torch.isfinite(v).all()):
            raise MergeError(f"fisher: non-finite Fisher information for tensor {k!r}; check the task's examples "
                             "and the fine-tuned model's weights")
    return {k: v / n for k, v in acc.items()}


@torch.no_grad()
def gram_statistics(model: torch.nn.Module, batches, keys) -> tuple[dict, dict]:
    """Input Grams of the linear layers whose weight is in ``keys``: ``({key: X^T X / #tokens (d_in, d_in)
    float64}, {key: "linear" | "conv1d"})``. Tokens are the positions with attention mask 1; ``keys`` that are
    not the weight of a plain linear layer are left out (RegMean averages them)."""
    from ..modelfn import eval_mode
    from ..ntk.engines import _linear_layers

    names = _param_names(model, keys)
    layers = {}
    for k, f in names.items():
        lay = _linear_layers(model, [f]) if f.endswith("weight") else None
        if lay is not None:
            layers[k] = lay[f]
    sums = {k: None for k in layers}
    tokens = {"n": 0, "mask": None}

    def hook_for(k):
        def hook(mod, args, out):
            x = args[0].detach().double()
            m = tokens["mask"]
            if x.ndim == 3 and m is not None and x.shape[:2] == m.shape:
                x = x[m.bool()]
            x = x.reshape(-1, x.shape[-1])
            g = x.T @ x
            sums[k] = g if sums[k] is None else sums[k] + g
        return hook

    handles = [mod.register_forward_hook(hook_for(k)) for k, (_, mod, _, _) in layers.items()]
    dev = next(model.parameters()).device
    try:
        with eval_mode(model):
            for b in batches:
                b = {kk: v.to(dev) for kk, v in b.items()}
                tokens["mask"] = b["attention_mask"]
                tokens["n"] += int(b["attention_mask"].sum())
                model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
    finally:
        for h in handles:
            h.remove()
    missing = [k for k, v in sums.items() if v is None]
    if missing:
        raise MergeError(f"regmean: layer of {missing[0]!r} was never called on the task's inputs")
    return ({k: (v / max(1, tokens["n"])).cpu() for k, v in sums.items()},
            {k: layers[k][3] for k in layers})


# --- a run's tasks ---------------------------------------------------------------------------------------


@dataclass
class TaskStatistics:
    """Per-task statistics of a data-aware merge: ``tensors[task][key]`` (Fisher: parameter shape; RegMean:
    ``(d_in, d_in)`` Grams), ``layout[key]`` (RegMean: ``"linear"`` | ``"conv1d"``), examples per task."""

    method: str
    tensors: dict[str, dict[str, torch.Tensor]]
    layout: dict[str, str] = field(default_factory=dict)
    n_examples: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict:
        """A JSON summary (for the model card): examples per task and how many tensors have statistics."""
        return {"method": self.method, "examples_per_task": self.n_examples,
                "tensors_with_statistics": len(next(iter(self.tensors.values()), {}))}


def run_statistics(run, method: str, tasks: list[str], keys, n_examples: int = 256, device=None,
                   normalize: bool = True, rank: int = 20, n_kernel: int = 128) -> TaskStatistics:
    """Statistics of ``method`` for each task of ``run`` (a :class:`~taskvec.runs.Run` or its directory):
    at the task's fine-tuned model (:meth:`Run.finetuned_model`) on its first ``n_examples`` seeded training
    examples (:meth:`Run.kernel_batches`). Fisher: each task's Fisher divided by its L2 norm over ``keys``
    when ``normalize``. NTK-aware methods: :func:`ntk_statistics` (``rank``, ``n_kernel``).

    Fisher and RegMean statistics are cached in the run (:meth:`~taskvec.runs.Run.cache_path`, keyed by the
    method, tasks, tensors, examples and normalisation and by the task vector files), so the merge stage's
    and the validate stage's merges of one run compute them once."""
    from ..runs import RunError, device_of, open_run

    if not is_data_aware(method):
        raise MergeError(f"method {method!r} is not data-aware; data-aware methods: {', '.join(DATA_AWARE)}")
    try:
        run = open_run(run)
    except RunError as e:
        raise MergeError(f"method {method!r} takes its task data from the run: {e}") from None
    dev = device_of(device)
    keys = sorted(keys)
    if not keys:
        raise MergeError(f"method {method!r}: no tensors to merge")
    if method in NTK_AWARE:
        return ntk_statistics(run, method, tasks, keys, rank, n_kernel, dev)
    cache = run.cache_path(f"{method}-statistics", {"method": method, "tasks": list(tasks), "keys": keys,
                                                     "n_examples": n_examples, "normalize": normalize})
    if cache is not None and cache.is_file():
        return _load_statistics(cache, method)
    stats = _compute_statistics(run, method, tasks, keys, n_examples, dev, normalize)
    if cache is not None:
        _save_statistics(cache, stats)
    return stats


def _save_statistics(path: Path, stats: TaskStatistics) -> None:
    """Cache ``stats`` as one safetensors file (``task/key`` tensors; layout and examples in its metadata),
    written atomically; a run directory that cannot be written to is left without the cache."""
    import json as _json

    from safetensors.torch import save_file

    from ..io import atomic_file

    flat = {f"{t}/{k}": v.contiguous() for t, d in stats.tensors.items() for k, v in d.items()}
    meta = {"layout": _json.dumps(stats.layout), "n_examples": _json.dumps(stats.n_examples),
            "tasks": _json.dumps(list(stats.tensors))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(flat, str(tmp), metadata=meta)
    except OSError as e:
        log.warning("could not cache %s statistics in %s (%s); they will be computed again", stats.method, path, e)


def _load_statistics(path: Path, method: str) -> TaskStatistics:
    import json as _json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors: dict[str, dict] = {t: {} for t in _json.loads(meta["tasks"])}
        for name in f.keys():
            t, k = name.split("/", 1)
            tensors[t][k] = f.get_tensor(name)
    log.info("%s statistics read from the cache %s", method, path)
    return TaskStatistics(method, tensors, _json.loads(meta["layout"]), _json.loads(meta["n_examples"]))


def _compute_statistics(run, method, tasks, keys, n_examples, dev, normalize) -> TaskStatistics:
    stats = TaskStatistics(method, {})
    for t in tasks:
        rt = run.task(t)
        if rt.splits is None or not len(rt.splits.train):
            raise MergeError(f"method {method!r}: task {t!r} of {run.root} has no training examples (split.json)")
        model = run.finetuned_model(t, device=dev)
        batches = run.kernel_batches(t, n_examples, batch_size=16)
        stats.n_examples[t] = len(batches.indices)
        if method == "fisher":
            F = fisher_statistics(model, batches, keys)
            if normalize:
                norm = float(sum(float((v ** 2).sum()) for v in F.values())) ** 0.5
                F = {k: v / norm for k, v in F.items()} if norm > 0 else F
            stats.tensors[t] = F
        else:
            stats.tensors[t], layout = gram_statistics(model, batches, keys)
            stats.layout.update(layout)
        del model
    return stats


def ntk_statistics(run, method: str, tasks: list[str], keys, rank: int, n_kernel: int, device) -> TaskStatistics:
    """The NTK-aware merge direction Σ_t τ_t' of every task of ``run`` (``tensors["*"][key]``), from validation's
    eigenspace phase: the top-``rank`` eigenspaces of each task's eNTK on its first ``n_kernel`` seeded
    training examples. Every task of the run takes part (``tasks`` must be all of them, in the run's order)."""
    from ..errors import TaskvecError
    from ..validation.context import load_context
    from ..validation.eigen import eigenspace_phase

    if list(tasks) != run.names:
        raise MergeError(f"method {method!r} projects each task vector out of the other tasks' eigenspaces: it "
                         f"merges every task of {run.root} ({', '.join(run.names)}), not a selection "
                         f"({', '.join(tasks)})")
    try:
        ctx = load_context(run, 1, n_kernel, device, 0)
        eig = eigenspace_phase(ctx, rank, n_kernel, ntk_aware=True, progress=False)
    except TaskvecError as e:
        raise MergeError(f"method {method!r}: {e}") from None
    direction = eig.directions["ntk_sum" if method == "ntk_aware" else "ntk_harm_sum"]
    missing = [k for k in keys if k not in direction]
    if missing:
        raise MergeError(f"method {method!r}: no NTK-aware direction for tensor {missing[0]!r}")
    return TaskStatistics(method, {"*": {k: direction[k] for k in keys}}, n_examples={t: n_kernel for t in tasks})


def merge_tensor(stats: TaskStatistics, key: str, deltas: list[torch.Tensor], weights: list[float],
                 params: dict) -> torch.Tensor:
    """The data-aware merged Δ of tensor ``key`` (the statistics' name) from its T task vectors."""
    if stats.method in NTK_AWARE:  # the direction is already merged over the tasks: Δ = λ·Σ_t τ_t'
        return params.get("lambda", 1.0) * stats.tensors["*"][key].to(deltas[0])
    tasks = list(stats.tensors)
    if len(tasks) != len(deltas):
        raise MergeError(f"{stats.method}: statistics of {len(tasks)} tasks for {len(deltas)} inputs")
    if stats.method == "fisher":
        fishers = [stats.tensors[t].get(key) for t in tasks]
        if any(f is None for f in fishers):
            raise MergeError(f"fisher: no Fisher for tensor {key!r}")
        return fisher_delta(deltas, fishers, weights, params.get("floor", 1e-6))
    if key in stats.layout:
        return regmean_delta(deltas, [stats.tensors[t][key] for t in tasks], weights, params.get("alpha", 0.9),
                             stats.layout[key], key)
    return mean_delta(deltas, weights)


# --- callers: the streaming engine and validation's in-memory merges --------------------------------------


def _global(cfg, name: str, default):
    return cfg.parameters.get(name, default)


def plan_statistics(p, device: str = "cpu") -> tuple[TaskStatistics, dict[str, str]]:
    """Statistics for an engine plan (:func:`taskvec.merge.engine.plan`) of a ``run:`` config, and the map
    from the plan's base tensor names to the statistics' names."""
    from .engine import _map, align

    cfg = p.cfg
    if cfg.run is None:
        raise MergeError(f"method {cfg.method!r} needs each task's data: give 'run: RUN' (a taskvec run or a "
                         "study's directory) instead of 'models'")
    if cfg.lora_rank:
        raise MergeError(f"method {cfg.method!r} writes a model; lora_rank is not available with it")
    covered = [n for n in p.names if n in p.merge and any(i.covers(n) for i in p.inputs)]
    keys = sorted({inp.keys.get(n, n) for n in covered for inp in p.inputs if inp.covers(n)})
    mapping = align(keys, covered)
    to_key = {_map(k, mapping): k for k in keys}
    if cfg.method in NTK_AWARE and any(cfg.model_params(i)["weight"] != 1 for i in range(len(cfg.models))):
        raise MergeError(f"method {cfg.method!r} sums the projected task vectors with weight 1; set lambda instead "
                         "of per-task weights")
    stats = run_statistics(cfg.run, cfg.method, [inp.name for inp in p.inputs], keys,
                           _global(cfg, "n_examples", 256), device, normalize=_global(cfg, "normalize", True),
                           rank=_global(cfg, "rank", 20), n_kernel=_global(cfg, "n_kernel", 128))
    return stats, {b: to_key[b] for b in covered if b in to_key}


def tensor_stream(p, device: str = "cpu"):
    """The engine's hook for a data-aware method: computes the statistics now (before any output exists; every
    error is raised here) and returns the tensor stream, a function like
    :func:`taskvec.merge.engine.merged_tensors` ``(plan, device, dtype, progress)``."""
    stats, to_key = plan_statistics(p, device)
    for prm in p.cfg.method_def.params:  # the defaults used, explicit in merge_config.yaml and the model card
        if not prm.per_model:
            p.cfg.parameters.setdefault(prm.name, prm.default)

    from .engine import merged_tensors

    def combine(name, base, deltas, weights, params):
        return merge_tensor(stats, to_key[name], deltas, weights, params)

    def stream(plan, device: str = "cpu", dtype: torch.dtype | None = None, progress=None):
        return merged_tensors(plan, device, dtype, progress=progress, combine=combine, combine_names=to_key)

    return stream


def merge_run_vectors(run, vectors, method: str, base_state: dict, tasks: list[str], device=None,
                      **params) -> dict:
    """In memory: the data-aware merged delta ``{name: Δ}`` of a run's task vectors (validation's merges),
    with the same statistics and per-tensor rule as ``taskvec merge`` with ``run:``.

    ``vectors``: T task vectors (``.deltas``) of ``tasks``; ``params``: the method's parameters (scalars).
    """
    from .methods import get_method

    m = get_method(method)
    unknown = set(params) - set(m.param_names)
    if unknown:
        raise MergeError(f"unknown parameters {sorted(unknown)} for {method}; valid: {m.param_names}")
    full = {p.name: params.get(p.name, p.default) for p in m.params}
    weights = full["weight"] if isinstance(full["weight"], (list, tuple)) else [full["weight"]] * len(vectors)
    keys = sorted(set().union(*[v.deltas for v in vectors]))
    stats = run_statistics(run, method, tasks, keys, full.get("n_examples", 256), device,
                           normalize=full.get("normalize", True), rank=full.get("rank", 20),
                           n_kernel=full.get("n_kernel", 128))
    out = {}
    for k in keys:
        base = base_state[k].float()
        deltas = [v.deltas[k].float() if k in v.deltas else torch.zeros_like(base) for v in vectors]
        out[k] = merge_tensor(stats, k, deltas, list(weights), full)
    return out


# --- registry ----------------------------------------------------------------------------------------------


def _positive_int(v) -> str | None:
    return _integer(v) or (None if v >= 1 else "must be at least 1")


def _nonneg(v) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    return None if ok else "must be a number ≥ 0"


def _unit_closed(v) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be in [0, 1]"


def _needs_statistics(base, deltas, weights, **params):
    raise MergeError(f"the data-aware methods ({', '.join(DATA_AWARE)}) need statistics of each task's data: merge a "
                     "run ('run: RUN' with taskvec merge) or call taskvec.merge.data_aware.merge_run_vectors")


N_EXAMPLES = Param("n_examples", 256, _positive_int, doc="training examples per task for the statistics")
register(Method("fisher", _needs_statistics,
                (WEIGHT, N_EXAMPLES, Param("floor", 1e-6, _nonneg, doc="ε added to every Fisher entry"),
                 Param("normalize", True, _boolean, doc="divide each task's Fisher by its L2 norm")),
                "Fisher-weighted average (diagonal Fisher of each fine-tuned model on its task's data)",
                mergekit=False))
for _name, _doc in (("ntk_aware", "remove from each τ_t its component in the other tasks' top-r eNTK eigenspaces"),
                   ("ntk_aware_harmful", "remove from each τ_t only the eigenspace components that raise the other "
                                         "tasks' training loss")):
    register(Method(_name, _needs_statistics,
                    (WEIGHT, Param("lambda", 1.0, _nonneg, doc="scale λ of the summed projected task vectors"),
                     Param("rank", 20, _positive_int, doc="r of each task's top-r eNTK eigenspace"),
                     Param("n_kernel", 128, _positive_int, doc="training examples per task of the eNTK")),
                    _doc + " (docs/validation.md); then λ·Σ_t τ_t'", mergekit=False))
register(Method("regmean", _needs_statistics,
                (WEIGHT, N_EXAMPLES, Param("alpha", 0.9, _unit_closed, doc="scale of the Grams' off-diagonal entries")),
                "RegMean: per linear layer (Σ G_t)⁻¹ Σ G_t W_t from the layer inputs' Grams; other tensors averaged",
                mergekit=False))

__all__ = ["DATA_AWARE", "NTK_AWARE", "TaskStatistics", "fisher_delta", "fisher_statistics", "gram_statistics", "is_data_aware",
           "mean_delta", "merge_run_vectors", "merge_tensor", "ntk_statistics", "plan_statistics", "regmean_delta",
           "run_statistics", "scale_off_diagonal", "tensor_stream"]
