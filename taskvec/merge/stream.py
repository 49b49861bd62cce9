"""Streaming merges on the CPU: a tensor merged chunk by chunk while the chunks are in cache.

:func:`streamed` is the engine's path for methods with a streaming form (:attr:`Method.stream`):
element-wise ones, top-k / outlier pruning followed by :func:`~taskvec.merge.methods.combine`, and
two-pass "reduce" methods (float64 sums over the chunks, then Δ per chunk). Chunks run on plain Python
threads (:func:`chunk_workers`) with torch single-threaded meanwhile; results come back in order, so the
output never depends on scheduling.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from .methods import MergeError
from .params import expand


def streamed(p, name: str, raw: torch.Tensor, model_params, global_params, t: float, out_dtype,
              return_delta=False) -> torch.Tensor:
    """A streamable method (``Method.stream``) on the CPU, chunk by chunk; equal to the whole-tensor one.

    Per task, the pruning rule (top-k threshold and tie quota) is found from a sample and one streamed
    pass over |τ_t|; then each chunk of every τ_t = θ_t − θ0 is formed, pruned and combined while it
    is in cache. Memory: the output tensor plus the inputs' mapped pages.
    """
    from . import methods
    from .methods import combine

    CHUNK = methods.CHUNK

    method = p.cfg.method_def
    weights, per_model, params = expand(p.cfg.method_def, name, t, model_params, global_params)
    work = torch.float64 if raw.dtype == torch.float64 else torch.float32
    n = raw.numel()
    bflat = raw.reshape(-1)
    xs, is_delta, labels = _inputs(p, name)

    def delta(i, a, b, bc):
        x = xs[i]
        if x is None:
            return torch.zeros_like(bc)
        return x[a:b].to(work, copy=True) if is_delta[i] else x[a:b].to(work) - bc

    def abs_chunk(i):
        return lambda a: delta(i, a, min(n, a + CHUNK), bflat[a:min(n, a + CHUNK)].to(work)).abs_()

    with chunk_workers() as pmap:
        rules = [None] * len(xs)
        if method.stream in ("magnitude", "outliers"):
            rules = [None if x is None or per_model["density"][i] >= 1 else
                     _pruning_rule(method.stream, x, is_delta[i], bflat, work, abs_chunk(i), per_model, i, pmap)
                     for i, x in enumerate(xs)]
        kw = {k: v for k, v in params.items() if k not in ("int8_mask", "seed")}
        coef = None
        if method.stream == "reduce":  # pass 1: the tensor's sums, chunk by chunk (added in order)
            stats_fn, finish, apply = method.reduce

            def stats_chunk(a):
                b = min(n, a + CHUNK)
                bc = bflat[a:b].to(work)
                return stats_fn(bc, [delta(i, a, b, bc) for i in range(len(xs))])

            total = None
            for s in pmap(stats_chunk, range(0, n, CHUNK)):
                total = s if total is None else total + s
            coef = finish(total, **{k: v for k, v in kw.items() if k in method.param_names})
        out = torch.empty(raw.shape, dtype=work if return_delta else out_dtype)
        oflat = out.view(-1)

        def one_chunk(a):
            b = min(n, a + CHUNK)
            bc = bflat[a:b].to(work)
            ds = [delta(i, a, b, bc) for i in range(len(xs))]
            if method.drops:  # pruning could hide a NaN/Inf: check every input (else the result, below)
                if not math.isfinite(sum(float(d.sum()) for d in ds) + float(bc.sum())):
                    _locate_nonfinite(p, name, raw, xs, labels, a, b)
            for i, r in enumerate(rules):
                if r is not None:
                    ad = ds[i].abs()
                    m = r[0].take(ad, a)
                    if r[1] is not None:
                        m &= ~r[1].take(ad, a)
                    ds[i].mul_(m)
            if method.stream == "elementwise":
                res = method(bc, ds, weights, **per_model, **params)
            elif coef is not None:
                res = method.reduce[2](bc, ds, coef)
            else:
                res = combine(ds, weights, consensus=method.consensus, normalize=kw["normalize"],
                              lambda_=kw["lambda"])
            if not return_delta:
                res.add_(bc)
            if not method.drops and not math.isfinite(float(res.sum())):
                _locate_nonfinite(p, name, raw, xs, labels, a, b)
            oflat[a:b] = res

        for _ in pmap(one_chunk, range(0, n, CHUNK)):
            pass
    return out


def _inputs(p, name: str) -> tuple[list, list[bool], list]:
    """Per input: its flat tensor for ``name`` (θ_t, or τ_t for task vectors / LoRA; None when it lacks
    it), whether that is already a delta, and ``(key, file)`` to name it in errors."""
    xs, is_delta, labels = [], [], []
    for inp in p.inputs:
        if name in inp.lora:
            xs.append(inp.adapter.delta(inp.lora[name]).reshape(-1))
            labels.append((inp.lora[name], inp.path))
        elif name in inp.keys:
            xs.append(inp.ckpt.get(inp.keys[name]).reshape(-1))
            labels.append((inp.keys[name], inp.ckpt.where[inp.keys[name]]))
        else:
            xs.append(None)
            labels.append(None)
        is_delta.append(inp.kind != "model")
    return xs, is_delta, labels


def _pruning_rule(kind: str, x, is_delta: bool, bflat, work, abs_chunk, per_model: dict, i: int, pmap):
    """Input ``i``'s streaming pruning rule: ``(keep, drop-or-None)`` top-k rules over |τ_i| — the top
    ``density`` share (``magnitude``), or breadcrumbs' kept band minus its ``gamma`` outliers (``outliers``)."""
    from . import methods
    from .methods import outlier_counts, select_topk

    n, density = bflat.numel(), per_model["density"][i]
    sample = None
    if n >= methods.SAMPLE_MIN_N:  # |τ| at random positions (only speeds up the exact selection)
        idx = torch.randint(0, n, (methods.SAMPLE_SIZE,), generator=torch.Generator().manual_seed(n))
        xv = x[idx].to(work)
        sample = (xv if is_delta else xv - bflat[idx].to(work)).abs_().sort().values
    if kind == "magnitude":
        return select_topk(abs_chunk, n, max(1, int(density * n)), sample, pmap), None
    keep, top = outlier_counts(n, density, per_model["gamma"][i])
    return (select_topk(abs_chunk, n, keep + top, sample, pmap),
            select_topk(abs_chunk, n, top, sample, pmap) if top else None)


_POOL: dict[int, ThreadPoolExecutor] = {}


@contextmanager
def chunk_workers():
    """A ``map`` over chunks run by as many Python threads as torch has intra-op threads, with torch
    single-threaded meanwhile. Small per-chunk ops under OpenMP stall badly when the cores are shared
    (measured: 113 s instead of 7 s for a 0.5B task arithmetic under load); independent chunks on
    plain threads do not. Results come back in order, so outputs do not depend on scheduling."""
    workers = torch.get_num_threads()
    if workers <= 1:
        yield map
        return
    pool = _POOL.get(workers) or _POOL.setdefault(workers, ThreadPoolExecutor(workers))
    torch.set_num_threads(1)
    try:
        yield pool.map
    finally:
        torch.set_num_threads(workers)


def _locate_nonfinite(p, name, raw, xs, labels, a, b):
    if not bool(torch.isfinite(raw.reshape(-1)[a:b]).all()):
        raise MergeError(f"tensor {name!r} in {p.base.where[name]} contains NaN or Inf")
    for x, label in zip(xs, labels):
        if x is not None and not bool(torch.isfinite(x[a:b]).all()):
            raise MergeError(f"tensor {label[0]!r} in {label[1]} contains NaN or Inf")


__all__ = ["chunk_workers", "streamed"]
