"""Merge configurations: taskvec's YAML, mergekit's YAML, validation before any tensor is read.

taskvec's format (a superset of mergekit's for the methods both have; see ``docs/merge.md``)::

    method: ties                 # or mergekit's key: merge_method
    base_model: minilm           # short name or directory
    models:                      # fine-tuned model dirs, task-vector files or peft adapter dirs
      - model: runs/a/finetune/sst2/model
        name: sst2               # optional task name (default: derived from the path)
        parameters: {weight: 1.0, density: 0.5}
    parameters: {lambda: 1.0, normalize: true}   # global; per-model names here are defaults
    dtype: float32               # output dtype (mergekit's meaning: the merge dtype), out_dtype wins
    seed: 0

or, for the tasks of a taskvec run, ``run: RUN/`` (optionally ``tasks: [a, b]`` or a mapping from task
name to its parameters) instead of ``models``; or, for ``passthrough`` (layer stacking), mergekit's
``slices: [{sources: [{model: DIR, layer_range: [a, b]}]}, ...]`` (see :mod:`taskvec.merge.passthrough`).

A parameter value is a number, a gradient (a list of numbers interpolated over layers), or a list of
``{filter: SUBSTRING, value: ...}`` rules, the first rule whose filter occurs in the tensor name winning
(mergekit's semantics). A parameter a method declares ``required`` (slerp's and nearswap's ``t``, as in
mergekit) must be set.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import passthrough as _passthrough  # noqa: F401  (registers the passthrough method)
from .methods import METHODS, MergeError, Method, get_method

TOP_KEYS = {
    "method", "merge_method", "base_model", "models", "slices", "run", "tasks", "source", "parameters", "dtype",
    "out_dtype", "seed", "shard_size", "lora_rank", "allow_different_tokenizers", "tokenizer_source",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}
VECTOR_FORMAT = "taskvec.task_vector"


@dataclass
class ModelSpec:
    """One input: a fine-tuned model directory, a task-vector file or a peft adapter directory.

    ``head_dir`` is a folder holding ``head.safetensors`` + ``head.json`` (a taskvec run's task head),
    copied to ``OUT/heads/<name>/``.
    """

    path: str
    name: str
    parameters: dict = field(default_factory=dict)
    head_dir: str | None = None


@dataclass
class SliceSource:
    """Layers ``layer_range = [a, b)`` of the model directory ``path`` (mergekit's slice source);
    ``None``: all its layers (``passthrough`` of one whole model)."""

    path: str
    layer_range: tuple[int, int] | None
    parameters: dict = field(default_factory=dict)


@dataclass
class SliceSpec:
    """One output slice: its source (``passthrough``: exactly one) and slice-level parameters."""

    sources: list[SliceSource]
    parameters: dict = field(default_factory=dict)


@dataclass
class MergeConfig:
    """A validated merge: method, base, inputs and (unevaluated) parameter settings.

    ``slices`` (``passthrough`` only) replaces ``models``; ``base_model`` may then be None (the
    non-layer tensors come from the first / last slice's model, as in mergekit).
    """

    method: str
    base_model: str | None
    models: list[ModelSpec]
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    seed: int = 0
    shard_size: int = 2 * 1024**3
    lora_rank: int | None = None
    allow_different_tokenizers: bool = False
    tokenizer_source: str | None = None  # None, "base", "union", "model:NAME" (merge/tokenizer.py)
    run: str | None = None
    slices: list[SliceSpec] | None = None

    @property
    def method_def(self) -> Method:
        return get_method(self.method)

    def model_params(self, i: int) -> dict:
        """Settings of model ``i``'s per-model parameters: its own, else the global default, else the
        method's default."""
        out = {}
        for p in self.method_def.params:
            if p.per_model:
                out[p.name] = self.models[i].parameters.get(p.name, self.parameters.get(p.name, p.default))
        return out

    def global_params(self) -> dict:
        m = self.method_def
        out = {p.name: self.parameters.get(p.name, p.default) for p in m.params if not p.per_model}
        if m.random:
            out["seed"] = self.parameters.get("seed", self.seed)
        return out

    def to_dict(self) -> dict:
        """Plain form for ``merge_config.yaml``."""
        d = {"method": self.method}
        if self.base_model is not None:
            d["base_model"] = self.base_model
        if self.run:
            d["run"] = self.run
        if self.slices is not None:
            d["slices"] = [_slice_dict(s) for s in self.slices]
        else:
            d["models"] = [{k: v for k, v in asdict(m).items() if v not in (None, {})} for m in self.models]
        d["parameters"] = self.parameters
        for k in ("dtype", "lora_rank"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d["seed"] = self.seed
        d["shard_size"] = self.shard_size
        if self.tokenizer_source:
            d["tokenizer_source"] = self.tokenizer_source
        if self.allow_different_tokenizers:
            d["allow_different_tokenizers"] = True
        return d


def _slice_dict(s: SliceSpec) -> dict:
    sources = []
    for src in s.sources:
        e = {"model": src.path}
        if src.layer_range is not None:
            e["layer_range"] = list(src.layer_range)
        if src.parameters:
            e["parameters"] = src.parameters
        sources.append(e)
    return {"sources": sources, **({"parameters": s.parameters} if s.parameters else {})}


# --- settings: scalars, gradients, filters ------------------------------------------------------


def evaluate(setting: Any, name: str, t: float) -> Any:
    """Value of a parameter setting for tensor ``name`` at layer position ``t`` ∈ [0, 1] (mergekit's rules).

    A scalar is itself; a list of numbers is a gradient interpolated at t; a list of ``{filter, value}``
    rules gives the value of the first rule whose filter is absent, ``*``, or a substring of ``name``;
    ``None`` when no rule matches.
    """
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            x = t * (len(setting) - 1)
            i0 = int(x)
            i1 = min(len(setting) - 1, i0 + 1)
            f = x - i0
            return (1 - f) * setting[i0] + f * setting[i1]
        for rule in setting:
            filt = rule.get("filter")
            if filt is None or filt == "*" or filt in name:
                return evaluate(rule["value"], name, t)
        return None
    raise MergeError(f"unexpected parameter setting {setting!r}")


def _leaves(setting: Any, where: str):
    """Yield every leaf value of a setting; MergeError for malformed rules."""
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        for rule in setting:
            bad = set(rule) - {"filter", "value"}
            if "value" not in rule or bad:
                raise MergeError(f"{where}: a filter rule needs keys 'value' and optionally 'filter', got {rule}")
            yield from _leaves(rule["value"], where)
    elif isinstance(setting, list):
        if not setting:
            raise MergeError(f"{where}: empty list")
        for e in setting:
            if isinstance(e, (list, dict)):
                raise MergeError(f"{where}: a gradient is a flat list of numbers, got {setting!r}")
            yield e
    elif isinstance(setting, dict):
        raise MergeError(f"{where}: expected a value, a list of numbers or a list of filter rules, got {setting!r}")
    else:
        yield setting


def _check_params(method: Method, params: dict, where: str, per_model_only: bool) -> None:
    allowed = [p.name for p in method.params if p.per_model or not per_model_only]
    if method.random and not per_model_only:
        allowed = allowed + (["seed"] if "seed" not in allowed else [])
    for key, setting in params.items():
        if key not in allowed:
            raise MergeError(f"{where}: unknown parameter {key!r} for method {method.name!r}; "
                             f"valid: {', '.join(allowed)}")
        p = method.param(key)
        for v in _leaves(setting, f"{where}.{key}"):
            err = p.check(v)
            if err:
                raise MergeError(f"{where}.{key} = {v!r}: {p.name} {err}")


# --- loading -------------------------------------------------------------------------------------------


def _parse_size(v) -> int:
    if isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(v), re.I)
    if not m:
        raise MergeError(f"shard_size {v!r}: expected bytes or e.g. '1GB', '500MB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _resolve_path(p: str, root: Path | None) -> str:
    from ..modeling import MODELS

    if p in MODELS:
        return p
    q = Path(p).expanduser()
    if not q.is_absolute() and root is not None and (root / q).exists():
        q = root / q
    return str(q.resolve()) if q.exists() else str(q)


def _task_name(path: str) -> str:
    p = Path(path)
    if p.name in ("model", "adapter") and p.parent.name:
        return p.parent.name
    return p.stem if p.suffix == ".safetensors" else p.name


def load_config(config: str | os.PathLike | dict | MergeConfig, **overrides) -> MergeConfig:
    """Parse and validate a merge config (a YAML path, a dict or a :class:`MergeConfig`).

    Accepts taskvec's keys and mergekit's (``merge_method``, ``models[].parameters``, top-level
    ``parameters``, ``dtype``/``out_dtype``, ``slices`` with ``passthrough``); refuses mergekit features
    taskvec does not have (``modules``, ``slices`` with other methods, ``model+lora`` references), and
    configs missing a required parameter. Relative paths are taken relative to the YAML
    file's folder when they exist there, else to the working directory. Nothing is read but
    ``run.json``. Raises :class:`MergeError` with the offending key.
    """
    if isinstance(config, MergeConfig):
        cfg = config
        known = {"method", "dtype", "seed", "shard_size", "lora_rank", "allow_different_tokenizers"}
        extra = {k for k, v in overrides.items() if v is not None} - known
        if extra:
            raise MergeError(f"cannot override {sorted(extra)} of a MergeConfig; valid: {', '.join(sorted(known))}")
        for k in known & set(overrides):
            if overrides[k] is not None:
                setattr(cfg, k, _parse_size(overrides[k]) if k == "shard_size" else overrides[k])
        _validate(cfg)
        return cfg
    root = None
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise MergeError(f"merge config {path} not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise MergeError(f"{path}: invalid YAML: {e}") from None
        root = path.resolve().parent
    else:
        raw = dict(config)
    if not isinstance(raw, dict):
        raise MergeError("a merge config is a mapping (method, base_model, models, ...)")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if "modules" in raw:
        raise MergeError("mergekit's 'modules' (per-module merges) is not supported by taskvec merge")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise MergeError(f"unknown config keys {sorted(unknown)}; valid: {', '.join(sorted(TOP_KEYS))}")
    method = raw.get("method", raw.get("merge_method"))
    if method is None:
        raise MergeError(f"config has no 'method' (or 'merge_method'); valid methods: {', '.join(METHODS)}")
    get_method(method)
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if not isinstance(raw.get("parameters") or {}, dict):
        raise MergeError(f"parameters: expected a mapping of parameter names to values, got {raw['parameters']!r}")
    params = dict(raw.get("parameters") or {})
    seed = raw.get("seed", params.get("seed", 0))
    cfg = MergeConfig(method=method, base_model="", models=[], parameters=params, dtype=dtype, seed=seed,
                      shard_size=_parse_size(raw.get("shard_size", 2 * 1024**3)), lora_rank=raw.get("lora_rank"),
                      allow_different_tokenizers=bool(raw.get("allow_different_tokenizers", False)))
    if method == "passthrough" or raw.get("slices") is not None:
        _load_slices(cfg, raw, root)
    elif raw.get("run") is not None:
        if raw.get("models"):
            raise MergeError("give either 'run' or 'models', not both")
        _expand_run(cfg, raw, root)
    else:
        if not raw.get("models"):
            raise MergeError("config needs 'models' (a list of inputs) or 'run' (a taskvec run directory)")
        if raw.get("base_model") is None:
            raise MergeError("config needs 'base_model'")
        cfg.base_model = _resolve_path(str(raw["base_model"]), root)
        if not isinstance(raw["models"], list):
            raise MergeError(f"models: expected a list of inputs ({{model: DIR}} or DIR), got {raw['models']!r}")
        for i, m in enumerate(raw["models"]):
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, dict) or "model" not in m:
                raise MergeError(f"models[{i}]: expected a mapping with key 'model', got {m!r}")
            bad = set(m) - {"model", "name", "parameters", "head"}
            if bad:
                raise MergeError(f"models[{i}]: unknown keys {sorted(bad)}; valid: model, name, parameters, head")
            if not isinstance(m.get("parameters") or {}, dict):
                raise MergeError(f"models[{i}].parameters: expected a mapping, got {m['parameters']!r}")
            p = _model_ref(m["model"], root, f"models[{i}]")
            cfg.models.append(ModelSpec(p, str(m.get("name") or _task_name(p)), dict(m.get("parameters") or {}),
                                        _resolve_path(m["head"], root) if m.get("head") else None))
    cfg.tokenizer_source = _tokenizer_source(raw.get("tokenizer_source"), cfg)
    _validate(cfg)
    return cfg


def _tokenizer_source(value, cfg: MergeConfig) -> str | None:
    from .tokenizer import parse_source

    if cfg.slices is not None and value not in (None, "base"):
        raise MergeError(f"tokenizer_source {value!r}: a passthrough (slices) merge takes its tokenizer from one "
                         "model; only 'base' is supported there")
    return parse_source(value, cfg.models)


def _model_ref(ref, root: Path | None, where: str) -> str:
    ref = str(ref)
    if "+" in ref and not Path(ref).exists():
        raise MergeError(f"{where}: mergekit's 'model+lora' references are not supported; "
                         "list the peft adapter directory itself as a model")
    return _resolve_path(ref, root)


def _mapping(v, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise MergeError(f"{where}: expected a mapping of parameter names to values, got {v!r}")
    return dict(v)


def _load_slices(cfg: MergeConfig, raw: dict, root: Path | None) -> None:
    """``slices`` (mergekit's layer stacking) for ``passthrough``; or ``models: [one model]`` (a copy)."""
    if cfg.method != "passthrough":
        raise MergeError(f"'slices' are supported with merge_method passthrough only (got {cfg.method!r}); "
                         "for other methods list whole models under 'models'")
    for k in ("run", "lora_rank"):
        if raw.get(k) is not None:
            raise MergeError(f"passthrough takes 'slices' (or one model under 'models'), not {k!r}")
    if raw.get("base_model") is not None:
        cfg.base_model = _resolve_path(str(raw["base_model"]), root)
    else:
        cfg.base_model = None
    slices, models = raw.get("slices"), raw.get("models")
    if slices is not None and models:
        raise MergeError("give either 'slices' or 'models', not both (mergekit: exactly one of them)")
    if slices is None:
        if not isinstance(models, list) or len(models) != 1:
            raise MergeError("passthrough needs 'slices' (layer ranges of models) or exactly one model under "
                             f"'models' (got {len(models) if isinstance(models, list) else 'none'})")
        m = models[0] if isinstance(models[0], dict) else {"model": models[0]}
        if set(m) - {"model", "parameters"} or "model" not in m:
            raise MergeError(f"models[0]: expected keys model and optionally parameters, got {m!r}")
        src = SliceSource(_model_ref(m["model"], root, "models[0]"), None,
                          _mapping(m.get("parameters"), "models[0].parameters"))
        if cfg.base_model is not None and cfg.base_model != src.path:
            raise MergeError("passthrough of one model copies that model: base_model must be absent or that "
                             "model (mergekit refuses this too); use 'slices' to take layers from several models")
        cfg.slices = [SliceSpec([src])]
        return
    if not isinstance(slices, list) or not slices:
        raise MergeError("'slices' must be a non-empty list of {sources: [{model, layer_range}]}")
    cfg.slices = []
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if isinstance(sl, dict) and "sources" not in sl and "model" in sl:  # taskvec shorthand: one source
            sl = {"sources": [{k: v for k, v in sl.items() if k != "parameters"}], "parameters": sl.get("parameters")}
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
            raise MergeError(f"{where}: expected a mapping with 'sources' (a list of {{model, layer_range}}), "
                             f"got {sl!r}")
        bad = set(sl) - {"sources", "parameters"}
        if bad:
            raise MergeError(f"{where}: unsupported keys {sorted(bad)}; valid: sources, parameters")
        if len(sl["sources"]) != 1:
            raise MergeError(f"{where}: passthrough takes exactly one source per slice, got {len(sl['sources'])}")
        sources = []
        for j, src in enumerate(sl["sources"]):
            w = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise MergeError(f"{w}: expected a mapping with 'model' and 'layer_range', got {src!r}")
            bad = set(src) - {"model", "layer_range", "parameters"}
            if bad:
                raise MergeError(f"{w}: unknown keys {sorted(bad)}; valid: model, layer_range, parameters")
            lr = src["layer_range"]
            if not (isinstance(lr, (list, tuple)) and len(lr) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
                raise MergeError(f"{w}.layer_range {lr!r}: expected [start, end], two integers")
            if not 0 <= lr[0] < lr[1]:
                raise MergeError(f"{w}.layer_range {list(lr)}: need 0 <= start < end (end is exclusive)")
            sources.append(SliceSource(_model_ref(src["model"], root, w), (lr[0], lr[1]),
                                       _mapping(src.get("parameters"), f"{w}.parameters")))
        cfg.slices.append(SliceSpec(sources, _mapping(sl.get("parameters"), f"{where}.parameters")))


def _expand_run(cfg: MergeConfig, raw: dict, root: Path | None) -> None:
    """Fill ``cfg``'s base and inputs from a taskvec run (read through :class:`taskvec.runs.Run`): per
    task its vector (``source: vectors``) or fine-tuned model (``models``; ``auto``: the vector when
    extracted), with the task's head."""
    from ..runs import RunError, open_run

    try:
        run = open_run(_resolve_path(str(raw["run"]), root), require="run")
    except RunError as e:
        raise MergeError(f"run directory: {e}") from None
    cfg.run = str(run.root)
    cfg.base_model = _resolve_path(str(raw.get("base_model") or run.base_model), root)
    tasks = raw.get("tasks") or run.names
    per_task = tasks if isinstance(tasks, dict) else {t: {} for t in tasks}
    source = raw.get("source", "auto")
    if source not in ("auto", "vectors", "models"):
        raise MergeError(f"source {source!r}: valid: auto, vectors, models")
    for task, params in per_task.items():
        if task not in run.tasks:
            raise MergeError(f"task {task!r} is not in run {run.root}; its tasks: {', '.join(run.names)}")
        rt = run.task(task)
        vec = run.vector_path(task)
        if source == "vectors" or (source == "auto" and vec.is_file()):
            path = vec if vec.is_file() else None
        else:
            path = rt.model_dir
        if path is None:
            raise MergeError(f"run {run.root}: task {task!r} has neither a task vector ({vec}) nor a "
                             "fine-tuned model directory")
        head = rt.head_dir
        cfg.models.append(ModelSpec(str(path), task, dict((params or {}).get("parameters", params) or {}),
                                    str(head) if head is not None and (head / "head.safetensors").is_file() else None))
    if not cfg.models:
        raise MergeError(f"run {run.root}: no tasks to merge")


def _validate(cfg: MergeConfig) -> None:
    m = get_method(cfg.method)
    if (cfg.slices is None) == (m.name == "passthrough"):
        raise MergeError("passthrough needs 'slices' (or one model under 'models')" if cfg.slices is None else
                         f"'slices' are supported with merge_method passthrough only (got {m.name!r})")
    _check_params(m, cfg.parameters, "parameters", per_model_only=False)
    for i, spec in enumerate(cfg.models):
        _check_params(m, spec.parameters, f"models[{i}] ({spec.name}).parameters", per_model_only=True)
    for i, sl in enumerate(cfg.slices or []):
        _check_params(m, sl.parameters, f"slices[{i}].parameters", per_model_only=False)
        for j, src in enumerate(sl.sources):
            _check_params(m, src.parameters, f"slices[{i}].sources[{j}].parameters", per_model_only=True)
    for p in m.params:  # required parameters (mergekit's ``required``): before any tensor is read
        if p.required and (p.name not in cfg.parameters if not p.per_model else
                           any(p.name not in s.parameters and p.name not in cfg.parameters for s in cfg.models)):
            raise MergeError(f"method {m.name!r} requires parameter {p.name!r} ({p.doc}); set parameters.{p.name}")
    names = [s.name for s in cfg.models]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        for i, s in enumerate(cfg.models):  # make task names unique: a, a -> a, a_1
            if s.name in dup:
                s.name = f"{s.name}_{i}"
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise MergeError(f"dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    if cfg.slices is not None and cfg.lora_rank is not None:
        raise MergeError("passthrough (slices) writes a model; lora_rank is not available with it")
    if cfg.lora_rank is not None and (not isinstance(cfg.lora_rank, int) or cfg.lora_rank < 1):
        raise MergeError(f"lora_rank {cfg.lora_rank!r}: must be a positive integer")
    if cfg.shard_size < 1:
        raise MergeError("shard_size must be positive")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise MergeError(f"seed {cfg.seed!r}: must be an integer")
    if not cfg.models and not cfg.slices:
        raise MergeError("no input models")


def check_required(cfg: MergeConfig, names, position) -> None:
    """Every required parameter set by filter rules has a value for every tensor in ``names``
    (``position(name)`` = its layer position): else a MergeError naming the first tensor without one."""
    m = cfg.method_def
    for p in m.params:
        if not p.required:
            continue
        settings = [s.parameters.get(p.name, cfg.parameters.get(p.name)) for s in cfg.models] if p.per_model \
            else [cfg.parameters.get(p.name)]
        for setting in settings:
            if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
                for n in names:
                    if evaluate(setting, n, position(n)) is None:
                        raise MergeError(f"method {m.name!r} requires parameter {p.name!r}, but no filter rule of "
                                         f"it matches tensor {n!r}; add a rule without 'filter'")


# --- writing --------------------------------------------------------------------------------------------


def dump_yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


def to_mergekit(cfg: MergeConfig, kinds: dict[str, str] | None = None) -> dict:
    """The equivalent mergekit config (a dict for ``yaml.safe_dump``).

    Raises :class:`MergeError` where mergekit cannot express the merge: a method it lacks (``tsv``,
    ``iso_c``), inputs that are not model directories (task-vector files, peft adapters), or the
    ``"density"`` rescale mode.
    """
    m = get_method(cfg.method)
    if not m.mergekit:
        raise MergeError(f"mergekit has no method {cfg.method!r}; cannot write a mergekit config")
    for spec in cfg.models:
        kind = (kinds or {}).get(spec.path)
        if kind not in (None, "model") or spec.path.endswith(".safetensors"):
            raise MergeError(f"mergekit reads model directories only; input {spec.path} is a "
                             f"{kind or 'task-vector file'}")
    if cfg.parameters.get("rescale") == "density":
        raise MergeError('mergekit has no rescale="density" mode')
    if cfg.slices is not None:
        return _slices_to_mergekit(cfg)
    models = []
    for i, spec in enumerate(cfg.models):
        params = {"weight": 1.0} | cfg.model_params(i) | spec.parameters
        models.append({"model": spec.path, "parameters": params})
    out = {"merge_method": cfg.method, "base_model": cfg.base_model, "models": models}
    g = {k: (v if k != "rescale" else bool(v)) for k, v in cfg.parameters.items()
         if k != "seed" and not m.param(k).per_model}
    if g:
        out["parameters"] = g
    if cfg.tokenizer_source:
        from .tokenizer import mergekit_source

        out["tokenizer_source"] = mergekit_source(cfg.tokenizer_source, cfg.models)
    out["dtype"] = cfg.dtype or "float32"
    return out


def _slices_to_mergekit(cfg: MergeConfig) -> dict:
    """mergekit's passthrough: its embeddings come from the first slice's model and its other non-layer
    tensors (final norm, LM head) from the last slice's, whatever ``base_model`` says; taskvec takes them
    from ``base_model`` when given, so a base other than those models cannot be written for mergekit."""
    first, last = cfg.slices[0].sources[0].path, cfg.slices[-1].sources[0].path
    if cfg.base_model is not None and not cfg.base_model == first == last:
        raise MergeError(f"mergekit's passthrough takes the embeddings from the first slice's model ({first}) and "
                         f"the final norm / LM head from the last slice's ({last}), not from base_model "
                         f"{cfg.base_model}; drop base_model to write this merge for mergekit")
    out = {"merge_method": "passthrough"}
    if cfg.base_model is not None:
        out["base_model"] = cfg.base_model
    if len(cfg.slices) == 1 and cfg.slices[0].sources[0].layer_range is None:
        src = cfg.slices[0].sources[0]
        out["models"] = [{"model": src.path, **({"parameters": src.parameters} if src.parameters else {})}]
    else:
        out["slices"] = [_slice_dict(s) for s in cfg.slices]
    if cfg.parameters:
        out["parameters"] = cfg.parameters
    if cfg.dtype is not None:  # else mergekit keeps each tensor's dtype
        out["dtype"] = cfg.dtype
    return out
