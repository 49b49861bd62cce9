"""A study: checkpoints made anywhere + evaluation data, turned into a run every stage reads.

A study names one base model and, per task, a fine-tuned checkpoint (a Hugging Face
``AutoModelForSequenceClassification`` directory or a peft LoRA adapter directory), its data (a CSV/TSV/JSONL
file with named columns, a bundled task, or a :class:`~taskvec.tasks.Task` in Python) and its metric. In
YAML, in the spirit of a mergekit config::

    base_model: minilm                 # short name or a local HF directory
    scope: qkv                         # tensors of full fine-tunes that form their task vectors
    seed: 0
    test_size: 400                     # evaluation examples per task (at most half the data)
    tasks:
      - name: sentiment
        model: ckpts/sst2-classifier   # AutoModelForSequenceClassification directory
        data: data/sst2_eval.csv
        text_column: sentence
        label_column: label
      - name: topic
        model: ckpts/topic-lora        # peft adapter (its modules_to_save head is the task head)
        data: bbc_news

:func:`prepare_study` checks everything first — the base, every checkpoint, every data file and column, each
head against its data's labels, each task vector against the base's tensors — and only then writes the study
as a run directory (:mod:`taskvec.runs`): the heads read from the checkpoints (:mod:`taskvec.checkpoint_heads`),
seeded splits of the data (the ``train`` part gives kernel inputs, the ``test`` part evaluation examples)
and the task vectors (full fine-tunes restricted to ``scope``; LoRA adapters as the exact ΔW). From there
``taskvec ntk``, ``validate`` and ``report`` work as on a taskvec run.

Tasks scored by likelihood (``metric: lm_loss`` or ``multiple_choice``, with ``prompt`` and ``label_words``)
take ``…ForCausalLM`` checkpoints and their LM head (:func:`taskvec.checkpoint_heads.read_lm_head`); a study is
all-accuracy or all-likelihood, and the latter is validated in nats (:mod:`taskvec.lm_validate`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import TaskvecError

log = logging.getLogger(__name__)

#: a task's metric: ``accuracy`` (a classifier's head), or by likelihood with the checkpoint's LM head —
#: ``lm_loss`` (mean NLL of the texts, objective ``lm``) and ``multiple_choice`` (the label words as choices
#: after ``prompt``, objective ``choice``); see docs/lm.md
METRICS = ("accuracy", "lm_loss", "multiple_choice")
LM_OBJECTIVE = {"lm_loss": "lm", "multiple_choice": "choice"}
STUDY_KEYS = ("base_model", "tasks", "scope", "seed", "test_size", "val_size", "max_length")
TASK_KEYS = ("name", "model", "data", "text_column", "label_column", "text_pair_column", "metric", "prompt",
             "label_words")


class StudyError(TaskvecError):
    """A study is malformed or names a checkpoint / data file that does not fit; the message names it."""


@dataclass
class StudyTask:
    """One task of a study: its checkpoint, its data and how to read it, its metric."""

    name: str
    model: object  # an HF model / peft adapter directory, or {run: DIR, task: NAME} (a taskvec run's task)
    data: object  # a path, a bundled task name, or a taskvec.tasks.Task
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    metric: str = "accuracy"
    prompt: str | None = None  # multiple_choice: the template before each choice ({text}); default the task's
    label_words: list[str] | None = None  # multiple_choice: one choice per class (default the label names)


@dataclass
class Study:
    """A base model and at least two :class:`StudyTask` (see the module docstring for the YAML form)."""

    base_model: str
    tasks: list[StudyTask] = field(default_factory=list)
    scope: str = "qkv"
    seed: int = 0
    test_size: int = 1000
    val_size: int = 0  # a study needs no validation split: the smallest stratified one (one per class)
    max_length: int = 128

    def to_dict(self) -> dict:
        """Plain form (saved in the run's ``run.json``); a Task given in memory is saved by name."""
        import hashlib
        import json

        d = asdict(self) | {"tasks": []}
        for src in self.tasks:
            t = {k: v for k, v in asdict(src).items() if k != "data"}
            if isinstance(src.data, (str, Path)):
                t["data"] = str(src.data)
            else:  # named by its content, so a changed dataset is not mistaken for the saved one
                task = _task_data(src)
                h = hashlib.sha256(json.dumps([task.texts, task.labels, task.label_names, task.texts_b]).encode())
                t["data"] = f"<in memory: {type(src.data).__name__}, sha256 {h.hexdigest()[:16]}>"
            d["tasks"].append(t)
        return d


def _check_keys(d: dict, valid, where: str) -> None:
    if not isinstance(d, dict):
        raise StudyError(f"{where}: expected a mapping, got {type(d).__name__}")
    bad = sorted(set(d) - set(valid))
    if bad:
        raise StudyError(f"{where}: unknown keys {bad}; valid: {', '.join(valid)}")


def load_study(source) -> Study:
    """A :class:`Study` from a YAML path, a dict, or a Study (checked: keys, types, names, ≥ 2 tasks)."""
    import yaml

    if isinstance(source, Study):
        study, where = source, "study"
    else:
        where = "study"
        if isinstance(source, (str, Path)):
            p = Path(source)
            if not p.is_file():
                raise StudyError(f"study file {p} does not exist")
            try:
                source = yaml.safe_load(p.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise StudyError(f"{p}: not valid YAML ({e})") from None
            where = str(p)
        _check_keys(source, STUDY_KEYS, where)
        if "base_model" not in source or "tasks" not in source:
            raise StudyError(f"{where}: needs 'base_model' and 'tasks'")
        if not isinstance(source["tasks"], list):
            raise StudyError(f"{where}: 'tasks' must be a list of {{name, model, data}} entries")
        tasks = []
        for i, t in enumerate(source["tasks"]):
            _check_keys(t, TASK_KEYS, f"{where}: tasks[{i}]")
            missing = [k for k in ("name", "model", "data") if k not in t]
            if missing:
                raise StudyError(f"{where}: tasks[{i}] needs {', '.join(missing)}")
            tasks.append(StudyTask(**t))
        kw = {k: source[k] for k in STUDY_KEYS if k in source and k != "tasks"}
        for k in ("seed", "test_size", "val_size", "max_length"):
            if k in kw and (not isinstance(kw[k], int) or isinstance(kw[k], bool) or kw[k] < 0):
                raise StudyError(f"{where}: {k} must be a non-negative integer, got {kw[k]!r}")
        study = Study(tasks=tasks, **kw)
    names = [t.name for t in study.tasks]
    if len(names) < 2:
        raise StudyError(f"{where}: a study needs at least two tasks, found {len(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyError(f"{where}: task names must be unique; repeated: {', '.join(dup)}")
    for t in study.tasks:
        if not isinstance(t.name, str) or not t.name or "/" in t.name:
            raise StudyError(f"{where}: task name {t.name!r} must be a non-empty string without '/'")
        if t.metric not in METRICS:
            raise StudyError(f"{where}: task {t.name!r}: unknown metric {t.metric!r}; valid: {', '.join(METRICS)}")
        if t.metric != "multiple_choice" and (t.prompt is not None or t.label_words is not None):
            raise StudyError(f"{where}: task {t.name!r}: prompt and label_words belong to metric multiple_choice, "
                             f"not {t.metric}")
    kinds = {t.metric == "accuracy" for t in study.tasks}
    if len(kinds) > 1:
        raise StudyError(f"{where}: a study scores all its tasks by accuracy or all by likelihood (lm_loss, "
                         "multiple_choice); split it in two")
    from .scopes import check_scope

    check_scope(study.scope)
    return study


def _task_data(t: StudyTask):
    from .tasks import DataError, Task, load_task, load_task_file

    if isinstance(t.data, Task):
        return t.data
    if not isinstance(t.data, (str, Path)):  # a datasets.Dataset or a mapping of columns
        try:
            return Task.from_dataset(t.data, name=t.name, text_column=t.text_column, label_column=t.label_column,
                                     text_pair_column=t.text_pair_column)
        except (DataError, AttributeError, TypeError) as e:
            raise StudyError(f"task {t.name!r}: in-memory data: {e}") from None
    p = Path(t.data)
    try:
        if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
            return load_task_file(p, text_column=t.text_column, label_column=t.label_column,
                                  text_pair_column=t.text_pair_column, name=t.name)
        return load_task(str(t.data))
    except DataError as e:
        raise StudyError(f"task {t.name!r}: {e}") from None


def _lm_task(t: StudyTask, task):
    """The task as a likelihood task for an LM metric (objective, prompt, label words), else as it is."""
    import dataclasses

    if t.metric not in LM_OBJECTIVE:
        return task
    kw = {"objective": LM_OBJECTIVE[t.metric]}
    if t.prompt is not None:
        if not isinstance(t.prompt, str) or "{text}" not in t.prompt:
            raise StudyError(f"task {t.name!r}: prompt {t.prompt!r} must be a string naming the text column as "
                             "{text}")
        kw["prompt"] = t.prompt
    if t.label_words is not None:
        words = t.label_words
        if (not isinstance(words, list) or len(words) != task.num_labels
                or not all(isinstance(w, str) and w.strip() for w in words)):
            raise StudyError(f"task {t.name!r}: label_words must be a list of {task.num_labels} non-empty strings "
                             f"(one per class: {', '.join(task.label_names)}); got {words!r}")
        kw["label_words"] = list(words)
    return dataclasses.replace(task, **kw)


def _run_task(t: StudyTask):
    """``(Run, RunTask)`` of a study task whose model is a task of a taskvec run (``{run: DIR, task: NAME}``)."""
    from .runs import Run, RunError

    m = t.model
    bad = sorted(set(m) - {"run", "task"})
    if bad or "run" not in m:
        raise StudyError(f"task {t.name!r}: a model given as a mapping names a taskvec run task as "
                         f"{{run: DIR, task: NAME}}; got keys {sorted(m)}")
    try:
        src = Run.open(m["run"], require="finetune")
        return src, src.task(m.get("task", t.name))
    except RunError as e:
        raise StudyError(f"task {t.name!r}: {e}") from None


def _fingerprint(model_dir) -> str:
    from .task_vector import _as_state, state_fingerprint

    state, config = _as_state(model_dir)
    return state_fingerprint(state, config)


def _run_head(t: StudyTask, rt, label_names: list[str]):
    """A taskvec run task's own head (linear or label-word), its classes put in the data's label order."""
    from dataclasses import replace

    from safetensors.torch import load_file

    spec = rt.head
    if sorted(spec.label_names) != sorted(label_names):
        raise StudyError(f"task {t.name!r}: the run task's labels ({', '.join(spec.label_names)}) differ from the "
                         f"data's ({', '.join(label_names)})")
    perm = [spec.label_names.index(x) for x in label_names]
    state = load_file(str(rt.head_dir / "head.safetensors"))
    for k in list(state):
        if k in ("linear.weight", "linear.bias", "token_ids", "weight") and state[k].shape[0] == len(perm):
            state[k] = state[k][perm].contiguous()
    spec = replace(spec, label_names=list(label_names), task=t.name,
                   token_ids=[spec.token_ids[i] for i in perm] if spec.token_ids else [],
                   label_words=[spec.label_words[i] for i in perm] if spec.label_words else [],
                   source=f"{rt.head_dir} (taskvec {spec.kind} head)")
    return spec, state


def _checkpoint_kind(t: StudyTask) -> str:
    if isinstance(t.model, dict):
        return "run"
    p = Path(t.model)
    if (p / "adapter_config.json").is_file():
        return "adapter"
    if (p / "config.json").is_file():
        return "model"
    raise StudyError(f"task {t.name!r}: model {p} is neither a Hugging Face model directory (config.json) nor a "
                     "peft adapter directory (adapter_config.json)")


def _task_vector(t: StudyTask, kind: str, base_dir: Path, scope: str, base_shapes: dict):
    from .task_vector import TaskVector

    try:
        if kind == "run":
            src, rt = _run_task(t)
            if _fingerprint(src.base_model) != _fingerprint(base_dir):
                raise StudyError(f"task {t.name!r}: run {src.root} was fine-tuned from {src.base_model}, not the "
                                 f"study's base {base_dir} (their weights differ)")
            if rt.adapter_dir is not None:
                tv = TaskVector.from_peft(rt.adapter_dir, base=base_dir, task=t.name)
            else:
                tv = TaskVector.from_models(base_dir, rt.head_dir, scope=src.scope, task=t.name)
        elif kind == "adapter":
            tv = TaskVector.from_peft(Path(t.model), base=base_dir, task=t.name)
        else:
            tv = TaskVector.from_models(base_dir, Path(t.model), scope=scope, task=t.name)
    except TaskvecError as e:
        raise StudyError(f"task {t.name!r} ({t.model}): {e}") from None
    for k, d in tv.deltas.items():
        if k not in base_shapes:
            raise StudyError(f"task {t.name!r}: {t.model} changes tensor {k!r}, which the base model {base_dir} "
                             "does not have (an adapter or checkpoint of another base?)")
        if tuple(d.shape) != base_shapes[k]:
            raise StudyError(f"task {t.name!r}: tensor {k!r} has shape {tuple(d.shape)} in {t.model} but "
                             f"{base_shapes[k]} in the base model {base_dir}")
    tv.base_model = str(base_dir)
    return tv


def _base_shapes(base_dir: Path) -> dict:
    from .task_vector import _as_state

    state, _ = _as_state(base_dir)
    return {k: tuple(v.shape) for k, v in state.items()}


def prepare_study(source, out, overwrite: bool = False):
    """Check a study and write it as a run directory at ``out``; return its :class:`~taskvec.runs.Run`.

    A directory already holding the same study is reused as it is (so ``taskvec ntk STUDY --out D`` then
    ``taskvec validate STUDY --out D`` share it); one holding anything else is refused unless
    ``overwrite``. Nothing is written until every task has passed its checks.
    """
    from .checkpoint_heads import HeadError, read_head, read_lm_head
    from .modeling import ModelError, resolve_model
    from .runs import Run, read_description, write_study
    from .tasks import DataError, make_splits

    study = load_study(source)
    out = Path(out)
    try:
        base_dir = resolve_model(study.base_model)
    except ModelError as e:
        raise StudyError(f"base_model: {e}") from None
    record = study.to_dict() | {"base_model": str(base_dir)}
    old = read_description(out) if out.is_dir() else None
    if old is not None and old.get("study") == record and not overwrite:
        log.info("study %s: reusing %s", ", ".join(t.name for t in study.tasks), out)
        return Run.open(out, require="vectors")
    if old is not None and not overwrite:
        what = "another study" if old.get("kind") == "study" else "a taskvec run"
        raise StudyError(f"{out} holds {what}, not this study; pass overwrite=True (--overwrite) or choose a new "
                         "output directory")
    if out.exists() and not out.is_dir():
        raise StudyError(f"{out} exists and is not a directory")
    shapes = _base_shapes(base_dir)
    prepared = {}
    for t in study.tasks:
        kind = _checkpoint_kind(t)
        task = _lm_task(t, _task_data(t))
        task.name = t.name
        try:
            splits = make_splits(task, seed=study.seed, test_size=study.test_size,
                                 val_size=max(task.num_labels, study.val_size),
                                 max_test_fraction=0.5)
        except DataError as e:
            raise StudyError(f"task {t.name!r}: {e}") from None
        if kind == "run":
            rt = _run_task(t)[1]
            spec, head = _run_head(t, rt, task.label_names)
            source = {"model": str(rt.head_dir.resolve()), "kind": "run"}
        else:
            try:
                spec, head = (read_lm_head(t.model, base_dir, task, kind) if t.metric in LM_OBJECTIVE
                              else read_head(t.model, base_dir, task.label_names, task=t.name))
            except HeadError as e:
                raise StudyError(f"task {t.name!r}: {e}") from None
            source = {"model": str(Path(t.model).resolve()), "kind": kind}
        tv = _task_vector(t, kind, base_dir, study.scope, shapes)
        prepared[t.name] = {"task": task, "splits": splits, "head": (spec, head), "vector": tv, "source": source}
        log.info("study task %s: %s (%s), %d examples, head %s, ‖τ‖ = %.4g", t.name, t.model, kind, len(task),
                 spec.source, tv.norm())
    write_study(out, record, prepared, study.max_length)
    return Run.open(out, require="vectors")


def is_study(path) -> bool:
    """Whether ``path`` names a study file (YAML with ``base_model`` and ``tasks``) rather than a run."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in (".yaml", ".yml")


__all__ = ["METRICS", "Study", "StudyError", "StudyTask", "is_study", "load_study", "prepare_study"]
