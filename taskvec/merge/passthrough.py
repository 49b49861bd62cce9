"""``passthrough``: layer stacking with mergekit's ``slices`` / ``layer_range`` (incl. depth up-scaling).

A config ``slices: [{sources: [{model: A, layer_range: [0, 4]}]}, {sources: [{model: B, layer_range: [2, 6]}]}]``
gives a model whose decoder layers are A's layers 0–3 then B's layers 2–5, renumbered 0–7, and whose
``config.json`` says 8 layers. The plan maps every output tensor to ``(input checkpoint, source name)``;
:meth:`LayerPlan.write` streams them into a :class:`~taskvec.merge.writer.ShardWriter`. Nothing is merged.

Non-layer tensors (embeddings, final norm, LM head) and ``config.json`` / tokenizer come from
``base_model`` when it is given. Without it they follow mergekit: config.json and tokenizer from the first
slice's model, embeddings (names with ``embed``/``wte``/``wpe``) from the first slice's model, the other
non-layer tensors from the last slice's. ``scale`` (mergekit's only passthrough parameter) multiplies a
tensor; it is looked up like mergekit's: the source's ``parameters``, then the slice's, then the global
ones, as a number, a gradient over the slice's layers (t = i/(n−1); 0 for non-layer tensors) or
``{filter, value}`` rules matched against the source tensor's name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .methods import MergeError, Method, Param, register

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


def _number_or_none(v) -> str | None:
    ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    return None if ok else "must be a finite number"


def passthrough(base, deltas, weights, *, scale=None):
    """One model's tensor unchanged (× ``scale``), as a delta: θ0 + Δ = scale·θ_1.

    The engine stacks layers with :class:`LayerPlan`; this form serves in-memory merges of one input.
    """
    if len(deltas) != 1:
        raise MergeError(f"passthrough takes exactly one model per tensor, got {len(deltas)}; "
                         "stack layers of several models with 'slices'")
    s = scale[0] if isinstance(scale, (list, tuple)) else scale
    if s is None or s == 1:
        return deltas[0]
    return deltas[0].add(base).mul_(s).sub_(base)


register(Method("passthrough", passthrough, (
    Param("weight", 1.0, lambda v: None, per_model=True, doc="accepted, no effect"),
    Param("scale", None, _number_or_none, per_model=True, doc="multiply the tensor by this number")),
    "copy layers of models (mergekit's slices / layer_range): layer stacking, depth up-scaling"))


# --- planning -------------------------------------------------------------------------------------------


@dataclass
class _Model:
    """A model directory's headers, with names mapped into the output's (the donor's) namespace."""

    path: Path
    ckpt: object
    config: dict
    other: dict[str, str] = field(default_factory=dict)  # non-layer name -> key
    layers: dict[int, dict[tuple[str, str], str]] = field(default_factory=dict)  # i -> {(prefix, suffix): key}

    @property
    def num_layers(self) -> int:
        for k in LAYER_KEYS:
            if isinstance(self.config.get(k), int):
                return self.config[k]
        return max(self.layers) + 1 if self.layers else 0


@dataclass
class _Item:
    name: str  # output name
    model: _Model
    key: str  # tensor in model.ckpt
    src_name: str  # the source tensor's name in the output's namespace (what `scale` filters match)
    chain: list  # scale settings, most specific first
    t: float  # position in the slice (gradients)
    st: str  # default output dtype (safetensors name): the donor's
    layer: bool


@dataclass
class LayerPlan:
    """Every output tensor of a passthrough merge and where it comes from; headers only."""

    cfg: object
    base_dir: Path  # config.json, tokenizer
    items: list[_Item]
    config: dict  # the output config.json (layer count, layer_types updated)
    inputs: list[dict]  # {name, kind, path} of every model used
    table: list[tuple[int, int, str, int, int]]  # (out start, out end, model, src start, src end)

    def specs(self, out_dtype: torch.dtype | None) -> list[tuple[str, tuple, torch.dtype]]:
        from .checkpoint import FLOATS, ST_DTYPES

        out = []
        for it in self.items:
            st = it.model.ckpt.info[it.key][1]
            dt = ST_DTYPES[st] if st not in FLOATS else out_dtype or ST_DTYPES[it.st]
            out.append((it.name, it.model.ckpt.shape(it.key), dt))
        return out

    def tensors(self, out_dtype: torch.dtype | None, progress=None):
        """Yield ``(name, tensor)`` in output order: the source tensor, × scale where one is set."""
        from .checkpoint import check_finite
        from .config import evaluate

        for it, (_, _, dtype) in zip(self.items, self.specs(out_dtype)):
            if progress is not None:
                progress.update(1)
            x = it.model.ckpt.get(it.key)
            if not x.is_floating_point():
                yield it.name, x
                continue
            check_finite(x, it.key, it.model.ckpt.where[it.key])
            s = next((v for v in (evaluate(c, it.src_name, it.t) for c in it.chain) if v is not None), None)
            if s is not None:
                x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32) * s
            yield it.name, x.to(dtype)

    def write(self, dest: Path, out_dtype: torch.dtype | None, dtype_name: str | None, progress=None):
        """Shards, index, config.json (layer count) and the base's other files into ``dest``;
        returns (tensors taken from slices, non-layer tensors)."""
        from .config import DTYPES
        from .engine import _copy_base_files
        from .writer import ShardWriter

        writer = ShardWriter(dest, self.specs(out_dtype), self.cfg.shard_size)
        try:
            for name, tensor in self.tensors(out_dtype, progress):
                writer.write(name, tensor)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        _copy_base_files(self.base_dir, dest, None)
        cfg = dict(self.config)
        if dtype_name is not None:
            cfg["torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"] = DTYPES[dtype_name]
        (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        n_layer = sum(1 for it in self.items if it.layer)
        return n_layer, len(self.items) - n_layer


def _open(ref: str, where: str, cache: dict, donor_names=None) -> _Model:
    from ..modeling import ModelError, resolve_model
    from .checkpoint import Checkpoint
    from .engine import _kind, _map, _read_json, align
    from .params import LAYER_INDEX

    if Path(ref).exists() and _kind(Path(ref)) != "model":
        what = "a peft adapter" if _kind(Path(ref)) == "lora" else "a task-vector file"
        raise MergeError(f"{where}: {ref} is {what}; passthrough stacks layers of model directories")
    try:
        d = Path(resolve_model(ref))
    except ModelError as e:
        raise MergeError(f"{where}: {e}") from None
    if d in cache:
        return cache[d]
    m = _Model(d, Checkpoint(d), _read_json(d / "config.json"))
    names = list(m.ckpt.info)
    mapping = align(names, donor_names) if donor_names is not None else ("", "")
    for key in names:
        n = _map(key, mapping)
        hit = LAYER_INDEX.search(n)
        if hit:
            m.layers.setdefault(int(hit.group(1)), {})[(n[:hit.start(1)], n[hit.end(1):])] = key
        else:
            m.other[n] = key
    cache[d] = m
    return m


def _hidden(cfg: dict):
    return next((cfg[k] for k in HIDDEN_KEYS if k in cfg), None)


def _check_layers(m: _Model, donor: _Model, a: int, b: int, where: str) -> None:
    if b > m.num_layers:
        raise MergeError(f"{where}.layer_range {[a, b]} is out of bounds: {m.path} has {m.num_layers} layers "
                         f"(ranges must lie within [0, {m.num_layers}])")
    hm, hd = _hidden(m.config), _hidden(donor.config)
    if hm is not None and hd is not None and hm != hd:
        raise MergeError(f"{where}: {m.path} has hidden size {hm} but the output model ({donor.path}) has {hd}; "
                         "layers can only be stacked from models of the same width")
    template = donor.layers[min(donor.layers)]
    for li in range(a, b):
        got = m.layers.get(li, {})
        if set(got) != set(template):
            p, s = min(set(got) ^ set(template))
            raise MergeError(f"{where}: layer {li} of {m.path} does not match the layers of {donor.path} "
                             f"({p}N{s} is in only one of them): the models' tensor names differ")
        for t, key in got.items():
            want, have = tuple(donor.ckpt.shape(template[t])), tuple(m.ckpt.shape(key))
            if want != have:
                raise MergeError(f"{where}: tensor {key!r} of {m.path} has shape {have} but the output model's "
                                 f"layers have {want} ({donor.path}): mismatched sizes")


def plan(cfg) -> LayerPlan:
    """Resolve every slice against its model's headers; MergeError for ranges out of bounds, unknown
    models, layers whose tensors or widths differ from the output model's. Reads no tensor data."""
    from .engine import _check_vocab

    cache: dict = {}
    base_given = cfg.base_model is not None
    donor = _open(cfg.base_model if base_given else cfg.slices[0].sources[0].path,
                  "base_model" if base_given else "slices[0].sources[0]", cache)
    donor_names = list(donor.ckpt.info)
    if not donor.layers:
        raise MergeError(f"{donor.path}: no layer tensors found (names like 'model.layers.0.*' or 'h.0.*')")
    template = donor.layers[min(donor.layers)]
    srcs = []
    for i, sl in enumerate(cfg.slices):
        src, where = sl.sources[0], f"slices[{i}].sources[0]"
        m = _open(src.path, where, cache, donor_names)
        if src.layer_range is None:
            src.layer_range = (0, m.num_layers)
        _check_layers(m, donor, *src.layer_range, where)
        srcs.append(m)
    g = cfg.parameters.get("scale")
    items, table, j = [], [], 0
    for sl, m in zip(cfg.slices, srcs):
        src = sl.sources[0]
        a, b = src.layer_range
        table.append((j, j + b - a, str(m.path), a, b))
        chain = [src.parameters.get("scale"), sl.parameters.get("scale"), g]
        for k, li in enumerate(range(a, b)):
            t = k / (b - a - 1) if b - a > 1 else 1.0  # mergekit's t within a slice
            for (p, s), key in m.layers[li].items():
                st = donor.ckpt.info[template[(p, s)]][1]
                items.append(_Item(f"{p}{j}{s}", m, key, f"{p}{li}{s}", chain, t, st, True))
            j += 1
    # non-layer tensors: the base's; without a base, mergekit's: embeddings from the first slice's model,
    # the rest (final norm, LM head) from the last slice's
    ends = {True: (0, srcs[0] if not base_given else donor), False: (-1, srcs[-1] if not base_given else donor)}
    if not base_given and srcs[-1] is not donor:
        _check_vocab(srcs[-1].path, donor.path, donor.config, cfg.allow_different_tokenizers)
    pre, post = [], []
    for n in donor_names:
        if n not in donor.other:
            continue
        is_pre = any(h in n for h in ("embed", "wte", "wpe")) and "lm_head" not in n  # mergekit's pre-weights
        end, m = ends[is_pre]
        sl = cfg.slices[end]
        if n not in m.other:
            hint = "" if base_given else (" (without base_model, embeddings come from the first slice's model and "
                                          "the other non-layer tensors from the last slice's; set base_model to "
                                          "take them from one model)")
            raise MergeError(f"{m.path} lacks tensor {n!r} of the output model ({donor.path}): the models' "
                             f"tensor names differ{hint}")
        want, have = tuple(donor.ckpt.shape(n)), tuple(m.ckpt.shape(m.other[n]))
        if want != have:
            raise MergeError(f"tensor {n!r}: shape {have} in {m.path} but {want} in {donor.path}")
        own = sl.sources[0].parameters.get("scale") if srcs[end] is m else None  # mergekit: same model only
        (pre if is_pre else post).append(_Item(n, m, m.other[n], n, [own, sl.parameters.get("scale"), g], 0.0,
                                               donor.ckpt.info[n][1], False))
    out_cfg = dict(donor.config)
    for k in [k for k in LAYER_KEYS if isinstance(out_cfg.get(k), int)] or ["num_hidden_layers"]:
        out_cfg[k] = j
    if isinstance(out_cfg.get("layer_types"), list):  # per-layer attention kinds follow their layers
        out_cfg["layer_types"] = [_layer_types(m, donor)[li] for sl, m in zip(cfg.slices, srcs)
                                  for li in range(*sl.sources[0].layer_range)]
    return LayerPlan(cfg, donor.path, pre + items + post, out_cfg, _inputs(donor, srcs, base_given), table)


def _layer_types(m: _Model, donor: _Model) -> list:
    lt = m.config.get("layer_types")
    lt = lt if isinstance(lt, list) and len(lt) >= m.num_layers else donor.config["layer_types"]
    return lt + lt[-1:] * max(0, m.num_layers - len(lt))


def _inputs(donor: _Model, srcs: list[_Model], base_given: bool) -> list[dict]:
    from .config import _task_name

    out, seen = [], set()
    for m in ([donor] if base_given else []) + srcs:
        if m.path not in seen:
            seen.add(m.path)
            name = _task_name(str(m.path))
            if name in {i["name"] for i in out}:
                name = f"{name}_{len(out)}"
            out.append({"name": name, "kind": "model", "path": str(m.path)})
    return out


__all__ = ["LayerPlan", "passthrough", "plan"]
