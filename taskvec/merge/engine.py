"""Streaming merge engine: safetensors in, one tensor at a time, sharded safetensors out.

:func:`merge` validates the config, opens every input's safetensors *headers* (not their data), aligns
tensor names with the base, checks shapes, vocabularies and tokenizers, and only then streams: for each
base tensor it reads the base and each input's tensor, calls the method, and writes the result straight
into a pre-planned shard file. Peak memory is about (inputs + 2) × the largest tensor; output shards are
written incrementally (their headers are known in advance), never buffered. Everything is written to a
temporary sibling directory renamed onto ``out`` at the end (:func:`taskvec.io.atomic_dir`).

Inputs (each ``models[i].model``):

* a model directory (``model.safetensors`` or shards + ``model.safetensors.index.json``): τ = θ_t − θ0;
* a taskvec task-vector file (``.safetensors`` with metadata ``format=taskvec.task_vector``): τ as stored,
  0 for absent tensors;
* a peft LoRA adapter directory (``adapter_config.json``): τ = ΔW = scaling·B·A on its targets
  (see :mod:`taskvec.merge.lora`).

Names are aligned per input by the prefix mapping (strip one leading component and/or add one of the
base's) that matches most base names: a ``BertForSequenceClassification`` save (``bert.encoder...``) or
a backbone save (``layers.0...``) lines up with a ``BertModel`` (``encoder...``) or ``LlamaForCausalLM``
(``model.layers.0...``) base. Tensors an input has outside the base's top-level modules (e.g.
``classifier.*``) are that task's head: kept per task in ``OUT/heads/<task>/``, never merged. Base
tensors outside the input's namespace (``lm_head`` for a backbone save) get τ = 0. Buffers (integer
tensors, ``position_ids``, ``inv_freq``) are copied from the base.

``passthrough`` configs (mergekit's ``slices``: layer stacking) are planned and streamed by
:mod:`taskvec.merge.passthrough`; :func:`merge` writes both kinds, with the model card
(:mod:`taskvec.merge.card`), atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ShapeMismatchError
from ..io import atomic_dir, check_output
from . import data_aware
from .card import MergeResult, model_card
from .checkpoint import FLOATS, ST_DTYPES, Checkpoint, check_finite, is_buffer
from .config import DTYPES, VECTOR_FORMAT, MergeConfig, check_required, dump_yaml, load_config, to_mergekit
from .lora import LoraAdapter, factorize, write_adapter
from .methods import MergeError
from .params import LAYER_INDEX, expand, layer_position
from .tokenizer import resolve as resolve_vocab
from .stream import streamed as _streamed
from .writer import ShardWriter

COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
              "spiece.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")
EMBED_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "embed_out", "shared")


# --- reading ------------------------------------------------------------------------------------------


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def align(names, base_names) -> tuple[str, str]:
    """Prefix mapping ``(strip, add)`` that maps most of ``names`` onto ``base_names``.

    A name ``n`` maps to ``add + n[len(strip):]`` when it starts with ``strip``. Candidates: strip one
    leading component of the inputs and/or add one leading component of the base; identity wins ties.
    """
    names, base = list(names), set(base_names)
    strips = [""] + sorted({_top(n) + "." for n in names if "." in n})
    adds = [""] + sorted({_top(n) + "." for n in base if "." in n})
    best, best_n = ("", ""), -1
    for s in strips:
        for a in adds:
            n = sum(1 for x in names if x.startswith(s) and a + x[len(s):] in base)
            if n > best_n:
                best, best_n = (s, a), n
    return best


def _map(name: str, mapping: tuple[str, str]) -> str:
    s, a = mapping
    return a + name[len(s):] if name.startswith(s) else name


@dataclass
class _Input:
    """One input of the merge after alignment: which base tensors it changes and how."""

    name: str
    path: Path
    kind: str  # "model" | "vector" | "lora"
    ckpt: Checkpoint | None = None
    adapter: LoraAdapter | None = None
    keys: dict[str, str] = field(default_factory=dict)  # base name -> key in ckpt (model/vector/lora full)
    lora: dict[str, str] = field(default_factory=dict)  # base name -> adapter target name
    heads: dict[str, str] = field(default_factory=dict)  # head tensor key -> key (model: extra tensors)
    head_dir: Path | None = None

    def covers(self, name: str) -> bool:
        return name in self.keys or name in self.lora

    def delta(self, name: str, base: torch.Tensor, check: bool = True) -> torch.Tensor | None:
        """τ for base tensor ``name`` (``base`` is θ0 in the working dtype/device), None when zero.

        ``check``: raise on NaN/Inf in the input tensor (else the caller checks the result).
        """
        if name in self.lora:
            d = self.adapter.delta(self.lora[name]).to(base.device, base.dtype)
            check_finite(d, self.lora[name], self.path)
            return d
        key = self.keys.get(name)
        if key is None:
            return None
        x = self.ckpt.get(key)
        if check:
            check_finite(x, key, self.ckpt.where[key])
        if self.kind == "vector":
            return x.to(base.device, base.dtype)
        if x.dtype == base.dtype:
            return torch.sub(x.to(base.device), base)
        return x.to(base.device, base.dtype).sub_(base)

    def check(self, name: str) -> None:
        """Raise naming the file and tensor if this input's tensor for ``name`` has NaN/Inf."""
        if name in self.keys:
            key = self.keys[name]
            check_finite(self.ckpt.get(key), key, self.ckpt.where[key])


def _kind(path: Path) -> str:
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return "lora"
    if path.is_file():
        return "vector"
    return "model"


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError as e:
        raise MergeError(f"{p}: invalid JSON ({e})") from None


def _vocab_fingerprint(d: Path) -> str | None:
    """Hash of a tokenizer's vocabulary (token → id, added tokens), None if it has no tokenizer files."""
    h = hashlib.sha256()
    if (d / "tokenizer.json").is_file():
        tj = _read_json(d / "tokenizer.json")
        h.update(json.dumps(tj.get("model", {}).get("vocab"), sort_keys=True).encode())
        h.update(json.dumps(sorted((t.get("id"), t.get("content")) for t in tj.get("added_tokens", []))).encode())
        return h.hexdigest()
    found = False
    for f in ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model"):
        if (d / f).is_file():
            h.update(f.encode() + (d / f).read_bytes())
            found = True
    return h.hexdigest() if found else None


# --- planning -------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    cfg: MergeConfig
    base_dir: Path
    base: Checkpoint
    inputs: list[_Input]
    names: list[str]  # base tensors in output order
    merge: set[str]  # names that go through the method (the rest are copied)
    num_layers: int
    vocab: object = None  # tokenizer.VocabPlan: vocabularies permuted / LM head untied


def _open_input(spec, base: Checkpoint, base_dir: Path, base_cfg: dict, allow_tok: bool, vocab=None) -> _Input:
    path = Path(spec.path)
    if not path.exists():
        raise MergeError(f"input {spec.name!r}: {path} does not exist")
    kind = _kind(path)
    inp = _Input(spec.name, path, kind, head_dir=Path(spec.head_dir) if spec.head_dir else None)
    base_names = list(base.info)
    base_tops = {_top(n) for n in base_names}
    if kind == "lora":
        inp.adapter = LoraAdapter(path, Checkpoint)
        inp.ckpt = inp.adapter.ckpt
        mapping = align(list(inp.adapter.targets) + list(inp.adapter.full), base_names)
        for t in inp.adapter.targets:
            b = _map(t, mapping)
            if b not in base.info:
                raise MergeError(f"adapter {path}: target {t!r} has no tensor in the base {base_dir}")
            _check_shape(b, base, inp.adapter.delta_shape(t), str(path), base_dir)
            inp.lora[b] = t
        full = inp.adapter.full
    else:
        inp.ckpt = vocab.checkpoint(spec.name, path, Checkpoint(path)) if vocab else Checkpoint(path)
        if kind == "vector" and inp.ckpt.metadata.get("format") != VECTOR_FORMAT:
            raise MergeError(f"{path} is a safetensors file but not a taskvec task vector "
                             f"(metadata format={inp.ckpt.metadata.get('format')!r}, expected {VECTOR_FORMAT!r})")
        full = {k: k for k in inp.ckpt.info}
        mapping = align(list(full), base_names)
        if kind == "model" and getattr(vocab, "source", None) is None:
            _check_vocab(path, base_dir, base_cfg, allow_tok)
    for short, key in full.items():
        b = _map(short, mapping)
        dtype = inp.ckpt.info[key][1]
        if b in base.info:
            if is_buffer(b, base.info[b][1]) or is_buffer(b, dtype):
                continue
            _check_shape(b, base, inp.ckpt.shape(key), str(inp.ckpt.where[key]), base_dir)
            inp.keys[b] = key
        elif is_buffer(short, dtype):
            continue
        elif kind != "vector" and _top(b) not in base_tops:
            inp.heads[short] = key
        else:
            raise MergeError(f"tensor {key!r} of {path} has no counterpart in the base {base_dir} "
                             f"(looked for {b!r}): the models' tensor names differ")
    if kind == "model":
        add = mapping[1]
        missing = [n for n in base_names if n not in inp.keys and not is_buffer(n, base.info[n][1])
                   and n.startswith(add)]
        if missing:
            raise MergeError(f"{path} lacks {len(missing)} tensor(s) of the base {base_dir}, e.g. {missing[0]!r}: "
                             "the models' tensor names differ")
    return inp


def _check_shape(name, base: Checkpoint, shape, where, base_dir) -> None:
    bshape = base.shape(name)
    if tuple(shape) == tuple(bshape):
        return
    if len(shape) == len(bshape) == 2 and shape[1] == bshape[1] and any(h in name for h in EMBED_HINTS):
        raise MergeError(f"different vocabulary sizes: tensor {name!r} has {bshape[0]} rows in the base "
                         f"{base_dir} but {shape[0]} in {where}; merge only models with the same tokenizer, or set "
                         "tokenizer_source (union, base or model:NAME)")
    raise ShapeMismatchError(f"tensor {name!r}: shape {tuple(bshape)} in the base {base_dir} but "
                             f"{tuple(shape)} in {where}")


def _check_vocab(path: Path, base_dir: Path, base_cfg: dict, allow_tok: bool) -> None:
    cfg = _read_json(path / "config.json")
    vb, vm = base_cfg.get("vocab_size"), cfg.get("vocab_size")
    if vb is not None and vm is not None and vb != vm:
        raise MergeError(f"different vocabulary sizes: base {base_dir} has vocab_size {vb}, {path} has {vm}; "
                         "set tokenizer_source (union, base or model:NAME) to merge them")
    fb, fm = _vocab_fingerprint(base_dir), _vocab_fingerprint(path)
    if fb and fm and fb != fm and not allow_tok:
        raise MergeError(f"different tokenizers: {path} and the base {base_dir} have different vocabularies; "
                         "set tokenizer_source (union, base or model:NAME) to map the embeddings into one vocabulary, or "
                         "allow_different_tokenizers: true to merge anyway (the base's tokenizer is used)")


def plan(cfg: MergeConfig) -> _Plan:
    """Open all headers and check that the inputs fit the base; reads no tensor data."""
    from ..modeling import ModelError, resolve_model

    if cfg.slices is not None:
        raise MergeError("a passthrough (slices) merge is planned by taskvec.merge.passthrough.plan")
    try:
        base_dir = resolve_model(cfg.base_model)
    except ModelError as e:
        raise MergeError(f"base_model: {e}") from None
    base = Checkpoint(base_dir)
    vocab = resolve_vocab(cfg, base_dir, base)  # None unless vocabularies / tying differ (tokenizer.py)
    base = vocab.base if vocab else base
    base_cfg = _read_json(base_dir / "config.json")
    inputs = [_open_input(s, base, base_dir, base_cfg, cfg.allow_different_tokenizers, vocab) for s in cfg.models]
    vocab and vocab.check_inputs(inputs)
    names = list(base.info)
    merge = {n for n in names if not is_buffer(n, base.info[n][1])}
    layers = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))]
    num_layers = base_cfg.get("num_hidden_layers") or (max(layers) + 1 if layers else 1)
    check_required(cfg, [n for n in names if n in merge], lambda n: layer_position(n, num_layers))
    return _Plan(cfg, base_dir, base, inputs, names, merge, num_layers, vocab)


# --- merging --------------------------------------------------------------------------------------------


def merged_tensors(p: _Plan, device: str = "cpu", dtype: torch.dtype | None = None, only_covered=False,
                   return_delta=False, progress=None, combine=None, combine_names=None):
    """Yield ``(name, tensor)`` for every base tensor in order: merged, or copied from the base.

    ``dtype`` is the output dtype of floating tensors (default: each base tensor's own). With
    ``only_covered`` only tensors some input changes are yielded; with ``return_delta`` the merged delta
    (float32) is yielded instead of θ0 + Δ. ``combine(name, base, deltas, weights, params) -> Δ`` replaces the
    method for the tensors of ``combine_names`` (the others are copied): the data-aware methods' hook
    (:func:`taskvec.merge.data_aware.tensor_stream`).
    """
    cfg, method = p.cfg, p.cfg.method_def
    model_params = [cfg.model_params(i) for i in range(len(cfg.models))]
    global_params = cfg.global_params()
    for name in p.names:
        if progress is not None:
            progress.update(1)
        covered = [inp for inp in p.inputs if inp.covers(name)]
        if only_covered and not covered:
            continue
        raw = p.base.get(name)
        skip = (name not in combine_names) if combine is not None else (
            name not in p.merge or (not covered and method.name != "linear"))
        if skip:
            yield name, (raw.to(dtype) if dtype is not None and raw.is_floating_point() else raw)
            continue
        if combine is None and method.stream and torch.device(device).type == "cpu" and method.streams(global_params):
            yield name, _streamed(p, name, raw, model_params, global_params, t=layer_position(name, p.num_layers),
                                  out_dtype=dtype or raw.dtype, return_delta=return_delta)
            continue
        if method.drops:
            check_finite(raw, name, p.base.where[name])
        work_dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
        base = raw.to(device, work_dtype)
        t = layer_position(name, p.num_layers)
        deltas = []
        for inp in p.inputs:
            d = inp.delta(name, base, check=method.drops)
            deltas.append(d if d is not None else torch.zeros_like(base))
        weights, per_model, params = expand(p.cfg.method_def, name, t, model_params, global_params)
        delta = (method(base, deltas, weights, **per_model, **params) if combine is None
                 else combine(name, base, deltas, list(weights), params))
        del deltas
        if return_delta:
            yield name, delta.cpu()
            continue
        out = delta.add_(base)  # = θ0 + Δ (addition is commutative in IEEE arithmetic)
        if not method.drops:  # NaN/Inf in any input reaches the result: check once, then find it
            s = out.sum(dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)
            if not torch.isfinite(s) and not bool(torch.isfinite(out).all()):
                check_finite(raw, name, p.base.where[name])
                for inp in p.inputs:
                    inp.check(name)
                raise MergeError(f"merging tensor {name!r} produced NaN/Inf (overflow?)")
        yield name, out.to("cpu", dtype or raw.dtype)


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, DTYPES[name])


def merge(config, out, overwrite: bool = False, device: str = "cpu", dtype: str | None = None,
          show_progress: bool = True, write_mergekit: bool = False, card_extra: str | None = None,
          **overrides) -> MergeResult:
    """Merge the models of ``config`` into the directory ``out``.

    Args:
        config: a YAML path, a dict or a :class:`MergeConfig` (see ``docs/merge.md``); taskvec's or
            mergekit's format.
        out: output directory: sharded safetensors + the base's config and tokenizer (loadable with
            ``transformers.AutoModel*.from_pretrained``), ``heads/<task>/`` for task heads,
            ``merge_config.yaml``, ``README.md`` (model card); with ``lora_rank`` in the config, a peft
            adapter directory instead. ``passthrough`` configs (``slices``) stack layers instead.
        overwrite: replace an existing ``out`` (refused otherwise, before any work).
        device: where the arithmetic runs (``"cpu"``, ``"cuda"``); I/O stays on the CPU.
        dtype: output dtype of floating tensors (float32, bfloat16, float16); overrides the config's
            ``dtype``/``out_dtype``; default: the base's dtype.
        show_progress: tqdm bar over tensors.
        write_mergekit: also write ``out/mergekit.yaml``, the same merge in mergekit's format.
        card_extra: markdown appended to the model card ``out/README.md`` (e.g. measured accuracies).
        **overrides: top-level config keys (e.g. ``method``, ``seed``) replacing the config's.
    Returns:
        :class:`MergeResult`.
    Raises:
        MergeError / ShapeMismatchError / OutputExistsError with the offending file, tensor and shapes.
    """
    t0 = time.time()
    if dtype is not None:
        overrides["dtype"] = dtype
    cfg = load_config(config, **overrides)
    out = Path(out)
    check_output(out, overwrite)
    if cfg.slices is not None:
        from . import passthrough

        p = passthrough.plan(cfg)
        inputs, kinds = p.inputs, {}
    else:
        p = plan(cfg)
        inputs = [{"name": i.name, "kind": i.kind, "path": str(i.path)} for i in p.inputs]
        kinds = {inp.path.as_posix(): inp.kind for inp in p.inputs}
    mergekit_cfg = to_mergekit(cfg, kinds) if write_mergekit else None
    if cfg.lora_rank and any(i.kind != "lora" or i.keys for i in p.inputs):
        raise MergeError("lora_rank output needs every input to be a LoRA adapter with LoRA targets only "
                         "(no modules_to_save / bias tensors)")
    out_dtype = _torch_dtype(cfg.dtype)
    if device != "cpu" and not torch.cuda.is_available() and str(device).startswith("cuda"):
        raise MergeError(f"device {device!r} requested but CUDA is not available")
    stream = merged_tensors  # data-aware methods: per-task statistics of the run, before anything is written
    if data_aware.is_data_aware(cfg.method):
        stream = data_aware.tensor_stream(p, device)
    from tqdm.auto import tqdm

    n_merged = n_copied = 0
    heads = []
    n_total = len(p.items) if cfg.slices is not None else len(p.names)
    with atomic_dir(out, overwrite) as tmp, tqdm(total=n_total, unit="tensor", desc=f"merge ({cfg.method})",
                                                 disable=not show_progress) as bar:
        if cfg.slices is not None:
            n_merged, n_copied = p.write(tmp, out_dtype, cfg.dtype, bar)
        elif cfg.lora_rank:
            n_merged = _write_lora(p, tmp, device, out_dtype, bar)
        else:
            specs = []
            for name in p.names:
                shape, st = p.base.info[name]
                dt = ST_DTYPES[st]
                if out_dtype is not None and st in FLOATS:
                    dt = out_dtype
                specs.append((name, shape, dt))
            writer = ShardWriter(tmp, specs, cfg.shard_size)
            try:
                for name, tensor in stream(p, device, out_dtype, progress=bar):
                    writer.write(name, tensor)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            n_merged = sum(1 for n in p.names if n in p.merge and any(i.covers(n) for i in p.inputs))
            n_copied = len(p.names) - n_merged
            _copy_base_files(p.base_dir, tmp, cfg.dtype)
            if p.vocab is not None:  # the merged tokenizer, vocab_size and tying
                p.vocab.save(tmp)
        if cfg.slices is None:
            heads = _write_heads(p, tmp)
        record = cfg.to_dict()
        record["inputs"] = inputs
        if getattr(p, "vocab", None) is not None:
            record["vocabulary"] = p.vocab.record()
        (tmp / "merge_config.yaml").write_text(dump_yaml(record))
        if mergekit_cfg is not None:
            (tmp / "mergekit.yaml").write_text(dump_yaml(mergekit_cfg))
        card = model_card(out, tmp, record, heads, base_dir=p.base_dir, adapter=bool(cfg.lora_rank),
                          layers=getattr(p, "table", None), extra=card_extra)
        (tmp / "README.md").write_text(card)
    return MergeResult(str(out), cfg.method, inputs, n_merged, n_copied, heads, time.time() - t0)


def _copy_base_files(base_dir: Path, dest: Path, dtype: str | None) -> None:
    for f in COPY_FILES:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, dest / f)
    if dtype is not None and (dest / "config.json").is_file():
        cfg = json.loads((dest / "config.json").read_text())
        key = "torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"
        cfg[key] = DTYPES[dtype]
        (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _write_heads(p: _Plan, dest: Path) -> list[str]:
    from safetensors.torch import save_file

    done = []
    for inp in p.inputs:
        target = dest / "heads" / inp.name
        if inp.head_dir is not None:
            target.mkdir(parents=True, exist_ok=True)
            for f in ("head.safetensors", "head.json"):
                if (inp.head_dir / f).is_file():
                    shutil.copy2(inp.head_dir / f, target / f)
            done.append(inp.name)
        elif inp.heads:
            target.mkdir(parents=True, exist_ok=True)
            state = {short: inp.ckpt.get(key).contiguous() for short, key in inp.heads.items()}
            save_file(state, str(target / "head.safetensors"), metadata={"format": "pt"})
            info = {"task": inp.name, "source": str(inp.path), "kind": "checkpoint_tensors",
                    "tensors": {k: list(v.shape) for k, v in state.items()}}
            (target / "head.json").write_text(json.dumps(info, indent=2) + "\n")
            done.append(inp.name)
    return done


def _write_lora(p: _Plan, dest: Path, device, out_dtype, bar) -> int:
    """Merged deltas of the LoRA targets, re-factorised to rank ``lora_rank``, as a peft adapter."""
    names, kinds = {}, {}
    for inp in p.inputs:
        for b, t in inp.lora.items():
            names.setdefault(b, t)
            kinds.setdefault(b, inp.adapter.targets[t].kind)
    factors = {}
    for name, delta in merged_tensors(p, device, only_covered=True, return_delta=True, progress=bar):
        A, B = factorize(delta.float(), p.cfg.lora_rank, transpose=kinds[name] != "linear")
        factors[names[name]] = (A, B, kinds[name])
    write_adapter(dest, factors, p.cfg.lora_rank, str(p.base_dir), out_dtype)
    return len(factors)


__all__ = ["Checkpoint", "MergeResult", "align", "merge", "merged_tensors", "plan"]

