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
name to its parameters) instead of ``models``. A parameter value is a number, a gradient (a list of
numbers interpolated over layers), or a list of ``{filter: SUBSTRING, value: ...}`` rules, the first
rule whose filter occurs in the tensor name winning (mergekit's semantics).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .methods import METHODS, MergeError, Method, get_method

TOP_KEYS = {
    "method", "merge_method", "base_model", "models", "run", "tasks", "source", "parameters", "dtype",
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
class MergeConfig:
    """A validated merge: method, base, inputs and (unevaluated) parameter settings."""

    method: str
    base_model: str
    models: list[ModelSpec]
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    seed: int = 0
    shard_size: int = 2 * 1024**3
    lora_rank: int | None = None
    allow_different_tokenizers: bool = False
    run: str | None = None

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
        d = {"method": self.method, "base_model": self.base_model}
        if self.run:
            d["run"] = self.run
        d["models"] = [{k: v for k, v in asdict(m).items() if v not in (None, {})} for m in self.models]
        d["parameters"] = self.parameters
        for k in ("dtype", "lora_rank"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d["seed"] = self.seed
        d["shard_size"] = self.shard_size
        if self.allow_different_tokenizers:
            d["allow_different_tokenizers"] = True
        return d


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
    ``parameters``, ``dtype``/``out_dtype``); refuses mergekit features taskvec does not have
    (``slices``, ``modules``, ``model+lora`` references). Relative paths are taken relative to the YAML
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
    for k in ("slices", "modules"):
        if k in raw:
            raise MergeError(f"mergekit's {k!r} (layer slicing / modules) is not supported by taskvec merge")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise MergeError(f"unknown config keys {sorted(unknown)}; valid: {', '.join(sorted(TOP_KEYS))}")
    method = raw.get("method", raw.get("merge_method"))
    if method is None:
        raise MergeError(f"config has no 'method' (or 'merge_method'); valid methods: {', '.join(METHODS)}")
    get_method(method)
    if raw.get("tokenizer_source") not in (None, "base"):
        raise MergeError("tokenizer_source: only 'base' is supported (the base's tokenizer is copied)")
    dtype = raw.get("out_dtype") or raw.get("dtype")
    params = dict(raw.get("parameters") or {})
    seed = raw.get("seed", params.get("seed", 0))
    cfg = MergeConfig(method=method, base_model="", models=[], parameters=params, dtype=dtype, seed=seed,
                      shard_size=_parse_size(raw.get("shard_size", 2 * 1024**3)), lora_rank=raw.get("lora_rank"),
                      allow_different_tokenizers=bool(raw.get("allow_different_tokenizers", False)))
    if raw.get("run") is not None:
        if raw.get("models"):
            raise MergeError("give either 'run' or 'models', not both")
        _expand_run(cfg, raw, root)
    else:
        if not raw.get("models"):
            raise MergeError("config needs 'models' (a list of inputs) or 'run' (a taskvec run directory)")
        if raw.get("base_model") is None:
            raise MergeError("config needs 'base_model'")
        cfg.base_model = _resolve_path(str(raw["base_model"]), root)
        for i, m in enumerate(raw["models"]):
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, dict) or "model" not in m:
                raise MergeError(f"models[{i}]: expected a mapping with key 'model', got {m!r}")
            bad = set(m) - {"model", "name", "parameters", "head"}
            if bad:
                raise MergeError(f"models[{i}]: unknown keys {sorted(bad)}; valid: model, name, parameters, head")
            ref = str(m["model"])
            if "+" in ref and not Path(ref).exists():
                raise MergeError(f"models[{i}]: mergekit's 'model+lora' references are not supported; "
                                 "list the peft adapter directory itself as a model")
            p = _resolve_path(ref, root)
            cfg.models.append(ModelSpec(p, str(m.get("name") or _task_name(p)), dict(m.get("parameters") or {}),
                                        _resolve_path(m["head"], root) if m.get("head") else None))
    _validate(cfg)
    return cfg


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
    _check_params(m, cfg.parameters, "parameters", per_model_only=False)
    for i, spec in enumerate(cfg.models):
        _check_params(m, spec.parameters, f"models[{i}] ({spec.name}).parameters", per_model_only=True)
    names = [s.name for s in cfg.models]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        for i, s in enumerate(cfg.models):  # make task names unique: a, a -> a, a_1
            if s.name in dup:
                s.name = f"{s.name}_{i}"
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise MergeError(f"dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    if cfg.lora_rank is not None and (not isinstance(cfg.lora_rank, int) or cfg.lora_rank < 1):
        raise MergeError(f"lora_rank {cfg.lora_rank!r}: must be a positive integer")
    if cfg.shard_size < 1:
        raise MergeError("shard_size must be positive")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise MergeError(f"seed {cfg.seed!r}: must be an integer")
    if not cfg.models:
        raise MergeError("no input models")


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
    models = []
    for i, spec in enumerate(cfg.models):
        params = {"weight": 1.0} | cfg.model_params(i) | spec.parameters
        models.append({"model": spec.path, "parameters": params})
    out = {"merge_method": cfg.method, "base_model": cfg.base_model, "models": models}
    g = {k: (v if k != "rescale" else bool(v)) for k, v in cfg.parameters.items()
         if k != "seed" and not m.param(k).per_model}
    if g:
        out["parameters"] = g
    out["dtype"] = cfg.dtype or "float32"
    return out
