"""``taskvec run CONFIG``: the whole pipeline, each stage cached and resumable.

Stages, in order (a config lists the ones to run):

``finetune``  fine-tune the base on every task with early stopping (:mod:`taskvec.finetune`); with a
              ``study`` (checkpoints made elsewhere, :mod:`taskvec.study`) in place of ``model``/``tasks``:
              check the study and write it as the run
``vectors``   extract task vectors into ``OUT/vectors/`` (:class:`taskvec.TaskVector`)
``ntk``       empirical NTK of the base on each task and its spectrum (:mod:`taskvec.ntk`)
``merge``     write each configured merge as a model directory with the tasks' heads (:mod:`taskvec.merge`)
``validate``  predict every merge from the linearised model, measure it, explain it through the eNTK
              eigenspaces, choose coefficients from predictions, build the NTK-aware merge
              (:mod:`taskvec.interference`)
``report``    ``OUT/report/report.html`` + PNG figures + ``OUT/results.json`` (:mod:`taskvec.report`)

A stage's inputs (its config section and the outputs of the stages before it) are hashed into
``OUT/stages.json``; a stage whose inputs changed is recomputed instead of reused. The packaged
``default`` config (``taskvec/configs/default.yaml``) is the README's main job.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import time
from importlib import resources
from pathlib import Path

import yaml

from .errors import TaskvecError
from .io import check_value, run_lock, write_json

log = logging.getLogger(__name__)

STAGES = ["finetune", "vectors", "ntk", "merge", "validate", "report"]
TOP_KEYS = {"model", "tasks", "study", "stages", "finetune", "ntk", "merge", "validate", "report"}


def merge_specs(cfg: dict) -> list:
    """The config's merges as :class:`~taskvec.merge.memory.MergeSpec` (``merge.methods`` entries)."""
    from .merge.memory import MergeSpec

    specs = []
    for i, m in enumerate((cfg.get("merge") or {}).get("methods") or []):
        m = dict(m)
        if "method" not in m:
            raise TaskvecError(f"merge.methods[{i}] has no 'method'")
        method = m.pop("method")
        name = m.pop("name", None) or method + "".join(f" {k}={v}" for k, v in m.items())
        specs.append(MergeSpec(name, method, m))
    return specs


#: validation's merges, built from the eigenspaces at the prediction-chosen λ (no merge-stage output)
NTK_AWARE = ("ntk_aware", "ntk_aware_harmful")
#: the ntk section's values with a fixed set of choices (the ``taskvec ntk`` flags')
NTK_CHOICES = {"mode": ("exact", "sketch", "reference"), "output": ("logits", "margin", "loss"),
               "kernel": ("full", "trace", "diagonal")}


def _read_yaml(p: Path, where: str):
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskvecError(f"{where}: not UTF-8 text (byte at offset {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TaskvecError(f"{where}: not valid YAML{at}: {problem}") from None


def load_config(config) -> dict:
    """A pipeline config from a dict, a YAML path, or a packaged name (``default``).

    Everything is checked here, before any stage runs: the top-level keys, their types (``tasks`` and
    ``stages`` lists of names, each stage's section a mapping), the ``finetune`` section as a
    :class:`~taskvec.finetune.FinetuneConfig`, the ``ntk`` and ``validate`` sections against the keyword
    arguments (and their types) of :func:`~taskvec.stages.ntk.run_ntk` and
    :func:`~taskvec.validation.validate_run`, and each merge's method and parameters. Raises
    :class:`TaskvecError` naming the file and the key.
    """
    if isinstance(config, dict):
        cfg, where = dict(config), "config"
    else:
        p = Path(str(config))
        if p.exists():
            cfg, where = _read_yaml(p, str(p)), str(p)
        else:
            packaged = resources.files("taskvec") / "configs" / f"{config}.yaml"
            if not packaged.is_file():
                names = sorted(f.name[:-5] for f in (resources.files("taskvec") / "configs").iterdir()
                               if f.name.endswith(".yaml"))
                raise TaskvecError(f"config {config!r} is neither a file nor a packaged config ({', '.join(names)})")
            cfg, where = _read_yaml(Path(str(packaged)), f"packaged config {config!r}"), f"config {config!r}"
        cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise TaskvecError(f"{where}: a pipeline config is a mapping (model, tasks, stages, ...), got "
                           f"{type(cfg).__name__}")
    cfg = dict(cfg)
    unknown = [k for k in cfg if k not in TOP_KEYS]
    if unknown:
        raise TaskvecError(f"{where}: unknown config keys {sorted(map(str, unknown))}; valid: {sorted(TOP_KEYS)}")
    if cfg.get("stages") is None:
        cfg["stages"] = list(STAGES)
    stages = _names(cfg["stages"], f"{where}: stages", "stage names")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise TaskvecError(f"{where}: unknown stages {bad}; valid stages: {STAGES}")
    _check_sections(cfg, where)
    if cfg.get("study") is not None:  # checkpoints made elsewhere (taskvec.study) instead of fine-tuning
        both = sorted({"model", "tasks", "finetune"} & set(cfg))
        if both:
            raise TaskvecError(f"{where}: a config with 'study' names its base model and tasks there; remove {both}")
        return cfg
    if cfg.get("model") is None:
        cfg["model"] = "minilm"
    if not isinstance(cfg["model"], (str, os.PathLike)):
        raise TaskvecError(f"{where}: model: expected a short name or a model directory, got {cfg['model']!r}")
    if not cfg.get("tasks"):
        from .tasks import DEFAULT_TASKS

        cfg["tasks"] = list(DEFAULT_TASKS)
    _names(cfg["tasks"], f"{where}: tasks", "bundled task names or .csv/.tsv/.jsonl paths", paths=True)
    return cfg


def _names(value, where: str, what: str, paths: bool = False) -> list:
    """``value`` checked to be a list of strings (or paths)."""
    kinds = (str, os.PathLike) if paths else (str,)
    if not isinstance(value, list) or not all(isinstance(v, kinds) for v in value):
        raise TaskvecError(f"{where}: expected a list of {what}, got {value!r}")
    return value


def _check_sections(cfg: dict, where: str) -> None:
    """Each stage's section: a mapping (or empty) whose keys and values its stage accepts."""
    import typing

    for key in ("finetune", "ntk", "merge", "validate", "report"):
        section = cfg.get(key)
        if section is not None and not isinstance(section, dict):
            raise TaskvecError(f"{where}: {key}: expected a mapping of settings, got {section!r}")
    section = cfg.get("finetune") or {}
    if section:
        from .finetune import FinetuneConfig

        valid = list(FinetuneConfig.__dataclass_fields__)
        bad = [k for k in section if k not in valid]
        if bad:
            raise TaskvecError(f"{where}: finetune: unknown keys {sorted(map(str, bad))}; valid: {', '.join(valid)}")
        try:
            fc = FinetuneConfig(**section)
        except (ValueError, TypeError) as e:  # ConfigError, or an unknown scope
            raise TaskvecError(f"{where}: finetune: {e}") from None
        from .stopping import rule_names

        bad = [r for r in fc.early_stopping if r not in rule_names()]
        if bad:
            raise TaskvecError(f"{where}: finetune.early_stopping: unknown early-stopping rule {bad[0]!r}; valid: "
                               f"{', '.join(rule_names())}")
    for key, func, fixed in (("ntk", "taskvec.stages.ntk:run_ntk", {"run", "out", "overwrite"}),
                             ("validate", "taskvec.validation:validate_run", {"run", "merges", "out", "overwrite"})):
        section = cfg.get(key) or {}
        if not section:
            continue
        import importlib

        mod, name = func.split(":")
        f = getattr(importlib.import_module(mod), name)
        hints = typing.get_type_hints(f)
        valid = [k for k in inspect.signature(f).parameters if k not in fixed]
        bad = [k for k in section if k not in valid]
        if bad:
            raise TaskvecError(f"{where}: {key}: unknown keys {sorted(map(str, bad))}; valid: {', '.join(valid)}")
        for k, v in section.items():
            if k in hints:
                check_value(f"{where}: {key}.{k}", v, hints[k])
            if key == "ntk" and k in NTK_CHOICES and v not in NTK_CHOICES[k]:
                raise TaskvecError(f"{where}: ntk.{k}: {v!r}; valid: {', '.join(NTK_CHOICES[k])}")
    section = cfg.get("merge") or {}
    bad = [k for k in section if k != "methods"]
    if bad:
        raise TaskvecError(f"{where}: merge: unknown keys {sorted(map(str, bad))}; valid: methods")
    methods = section.get("methods") or []
    if not isinstance(methods, list):
        raise TaskvecError(f"{where}: merge.methods: expected a list of {{method: NAME, ...parameters}}, got "
                           f"{methods!r}")
    if methods:
        from .merge.config import _check_params
        from .merge.methods import METHODS, get_method

        for i, m in enumerate(methods):
            at = f"{where}: merge.methods[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("method"), str):
                raise TaskvecError(f"{at}: expected a mapping with a 'method' (a method name), got {m!r}")
            if not isinstance(m.get("name", ""), (str, type(None))):
                raise TaskvecError(f"{at}.name: expected a string, got {m['name']!r}")
            method = m["method"]
            if method in NTK_AWARE:
                continue
            if method not in METHODS:
                raise TaskvecError(f"{at}.method: unknown merge method {method!r}; valid: "
                                   f"{', '.join([*METHODS, *NTK_AWARE])}")
            params = {k: v for k, v in m.items() if k not in ("method", "name")}
            _check_params(get_method(method), params, at, per_model_only=False)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _merge_dir(out: Path, name: str) -> Path:
    """``OUT/merges/<name>``: where the merge stage writes the merge named ``name`` (file-safe)."""
    from .runs import stage_path

    return stage_path(out, "merge") / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_"))


def _merge_stage(cfg: dict, out: Path, redo: bool) -> dict:
    """Write each configured merge (not the NTK-aware ones: the validate stage builds those in memory)."""
    from .merge import merge

    written = {}
    for spec in merge_specs(cfg):
        if spec.method in ("ntk_aware", "ntk_aware_harmful"):
            continue
        dest = _merge_dir(out, spec.name)
        if not dest.exists() or redo:
            merge({"run": str(out), "method": spec.method, "parameters": spec.params}, dest,
                  overwrite=True, show_progress=False)
        written[spec.name] = str(dest)
    return written


def _run_stage(stage: str, cfg: dict, out: Path, tasks: list, redo: bool):
    """Run one stage into ``out``; ``redo``: recompute what exists. Returns the stage's summary."""
    from .finetune import FinetuneConfig, finetune, results_table
    from .stages.vectors import extract_vectors

    if stage == "finetune" and cfg.get("study") is not None:  # a study: its checkpoints replace fine-tuning
        from .study import prepare_study

        run = prepare_study(cfg["study"], out, overwrite=redo)
        return {"study": True, "tasks": {t: run.description()["sources"][t] for t in run.names}}
    if stage == "finetune":
        res = finetune(cfg["model"], tasks, out, FinetuneConfig(**(cfg.get("finetune") or {})), overwrite=redo)
        log.info("fine-tuning results:\n%s", results_table(res))
        return {"table": results_table(res),
                "tasks": {r.task: {k: v for k, v in r.__dict__.items() if k != "curve"} for r in res}}
    if stage == "vectors":
        from .task_vector import TaskVector

        vs = extract_vectors(out, overwrite=redo)
        names = list(vs)
        return {"norms": {n: vs[n].norm() for n in names}, "tasks": names,
                "cosine": TaskVector.cosine_matrix(vs.values()).tolist()}
    if stage == "ntk":
        from .stages.ntk import run_ntk

        return run_ntk(out, overwrite=True, **(cfg.get("ntk") or {}))
    if stage == "merge":
        return _merge_stage(cfg, out, redo)
    if stage == "validate":
        from .lm_validate import is_lm_run, pipeline_stage
        from .runs import stage_path
        from .validation import validate_run

        if is_lm_run(out):  # causal-LM tasks: predictions and measurements in nats (taskvec.lm_validate)
            return pipeline_stage(out, dict(cfg.get("validate") or {}), merge_specs(cfg))

        res = validate_run(out, merges=merge_specs(cfg) or None, overwrite=True, **dict(cfg.get("validate") or {}))
        from .validation.best import annotate_cards  # the merge stage's model cards get the measured numbers

        annotate_cards(res, {s.name: _merge_dir(out, s.name) for s in merge_specs(cfg)})
        return {"summary": res["summary"], "path": str(stage_path(out, "validate")),
                "coefficients": {k: v for k, v in res["coefficients"].items() if k != "grid"}}
    if stage == "report":
        from .report import write_report

        return str(write_report(out, overwrite=True))
    raise TaskvecError(f"unknown stage {stage!r}; valid stages: {STAGES}")  # pragma: no cover


def run_pipeline(config="default", out="runs/default", overwrite: bool = False, stages=None) -> dict:
    """Run the configured stages into ``out``; returns the stage summaries (also in ``OUT/pipeline.json``;
    the report stage writes every number to ``OUT/results.json``).

    A stage whose inputs (its config section and every stage before it) are unchanged since it last
    finished is reused; one whose inputs changed is recomputed, and so is everything after it. The config,
    the tasks (and their splits) and the base model are checked before ``out`` is created, and ``out`` is
    locked for the whole run (:func:`taskvec.io.run_lock`): a second ``taskvec run`` (or ``taskvec
    finetune``) into it is refused with a one-line message naming this process.
    """
    from .tasks import load_task

    cfg = load_config(config)
    if stages:
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise TaskvecError(f"unknown stages {bad}; valid stages: {STAGES}")
    todo = [s for s in cfg["stages"] if stages is None or s in stages]
    if cfg.get("study") is not None:
        from .study import load_study

        study_record = load_study(cfg["study"]).to_dict()  # fail early on a malformed study
        tasks = []
    else:
        tasks = [load_task(t) for t in cfg["tasks"]]  # fail early on unknown task names
        if "finetune" in todo:  # and on bad splits or a bad base model directory, before OUT exists
            from .finetune import FinetuneConfig, preflight

            preflight(cfg["model"], tasks, FinetuneConfig(**(cfg.get("finetune") or {})))
    out = Path(out)
    with run_lock(out, "taskvec run"):
        return _run_locked(cfg, out, tasks, todo, overwrite, None if cfg.get("study") is None else study_record)


def _read_state(path: Path) -> dict:
    """``stages.json`` / ``pipeline.json``: a JSON object, or ``{}`` when absent."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TaskvecError(f"{path} is not valid JSON ({e}); remove it to recompute every stage") from None
    if not isinstance(state, dict):
        raise TaskvecError(f"{path} is not a JSON object; remove it to recompute every stage")
    return state


def _run_locked(cfg: dict, out: Path, tasks: list, todo: list, overwrite: bool, study_record) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "stages.json"
    state = _read_state(state_path)  # with overwrite too: the stages not run now keep their records
    results = _read_state(out / "pipeline.json")
    upstream = (_hash({"model": cfg["model"], "tasks": cfg["tasks"]}) if study_record is None
                else _hash({"study": study_record}))
    for stage in STAGES:
        key = _hash({"up": upstream, "cfg": cfg.get(stage, {})})
        upstream = _hash([upstream, key])
        if stage not in todo:
            continue
        stale = state.get(stage) != key
        # a run interrupted in this stage with the same inputs: keep what it finished (fine-tuned tasks and
        # their resumable checkpoints, task vectors, merges) instead of recomputing it
        resumed = not overwrite and state.get(stage) == f"started {key}"
        if not (overwrite or stale) and stage in results and stage in ("ntk", "validate", "report"):
            log.info("== stage %s: inputs unchanged, reusing %s", stage, out)
            continue
        t0 = time.time()
        log.info("== stage %s%s", stage, " (resuming an interrupted run)" if resumed and not overwrite else
                 " (inputs changed: recomputing)" if stale and stage in state else "")
        state[stage] = f"started {key}"  # until it finishes: what it leaves is reused only with these inputs
        write_json(state_path, state)
        results[stage] = _run_stage(stage, cfg, out, tasks, redo=overwrite or (stale and not resumed))
        state[stage] = key
        write_json(state_path, state)
        results.setdefault("wall_time_s", {})[stage] = time.time() - t0
        write_json(out / "pipeline.json", results)
    return results
