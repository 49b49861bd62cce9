"""``Run``: the one reader of a run directory, and what every stage reads a run through.

A run is one base model, its tasks (data, splits, heads, prompts) and, once extracted, one task vector per
task. Every stage (ntk, merge, validate, report, the CLI) asks a :class:`Run` for what it needs — the
base backbone, a task's θ0 model (base backbone + the task's head), its fine-tuned model, its task
vector, seeded example subsets and their batches — so they are built one way for everyone:

* examples are drawn by :meth:`Run.sample`: one numpy generator seeded with ``seed`` permutes the test,
  then the train, then the validation split of a task; a subset of ``n`` is the first ``n`` of that
  permutation, sorted (so a smaller ``n`` is a subset of a larger one, and the kernel examples of the
  validate stage are among those of the ntk stage);
* batches are tokenised with the run's tokenizer, the task's prompt (label-word heads of decoders read
  the label word after the prompt; encoders' linear heads see the plain text) and the run's
  ``max_length`` (:meth:`Run.batches`).

On disk (written by :func:`taskvec.finetune.finetune` and the stages; read only here)::

    RUN/run.json                       base_model, scope, tasks, config (FinetuneConfig)
    RUN/finetune/<task>/model/         fine-tuned backbone (save_pretrained) + tokenizer
    RUN/finetune/<task>/adapter/       peft adapter (LoRA scope)
    RUN/finetune/<task>/head.json      HeadSpec;  head.safetensors: the head's weights
    RUN/finetune/<task>/log.json       TaskResult + curve, stop reason, probe and test metrics, config
    RUN/finetune/<task>/split.json     split indices (Splits);  task.json: the task's data (save_task)
    RUN/vectors/<task>.safetensors     task vectors (TaskVector)
    RUN/ntk/, RUN/merges/, RUN/validation/, RUN/report/   stage outputs (paths: :meth:`Run.stage_dir`)

A :class:`Run` can also be built in memory (``Run(root, base_model, scope, tasks)``) from
:class:`RunTask` entries that point anywhere: the stages only use the methods below, never the layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import TaskvecError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STAGE_DIRS = {"finetune": "finetune", "vectors": "vectors", "ntk": "ntk", "merge": "merges",
              "validate": "validation", "report": "report"}
#: cached computations over a run's tasks (:meth:`Run.cache_path`), removed with the run's stage outputs
CACHE_DIR = "cache"
#: the order in which :meth:`Run.sample` draws each split's permutation from one generator
SAMPLE_ORDER = ("test", "train", "val")


class RunError(TaskvecError):
    """A run directory is missing, incomplete, or inconsistent; the message names the file."""


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} is missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({what}): {e}") from None


@dataclass
class RunTask:
    """One task of a run: where its data, split, head, fine-tuned model and task vector are.

    ``head_dir`` holds ``head.json`` + ``head.safetensors`` (a :class:`~taskvec.modeling.TaskModel`
    directory); ``model_dir`` the fine-tuned backbone (``None`` when only the vector is known);
    ``task_file`` the task's data (``task.json``) or ``None`` for a bundled task of the same name.
    """

    name: str
    splits: object  # taskvec.tasks.Splits (None: not split yet)
    head_dir: Path | None = None
    model_dir: Path | None = None
    adapter_dir: Path | None = None
    vector_path: Path | None = None
    task_file: Path | None = None
    log: dict = field(default_factory=dict)
    max_length: int = 128
    _task: object = field(default=None, repr=False)
    _head: object = field(default=None, repr=False)

    @property
    def task(self):
        """The task's labelled data (:class:`~taskvec.tasks.Task`), read once."""
        if self._task is None:
            from .tasks import load_saved_task, load_task

            self._task = load_saved_task(self.task_file) if self.task_file is not None else load_task(self.name)
        return self._task

    @property
    def head(self):
        """The task head's :class:`~taskvec.modeling.HeadSpec` (``None`` without a head)."""
        if self._head is None and self.head_dir is not None:
            from .modeling import HeadSpec

            self._head = HeadSpec(**_read_json(self.head_dir / "head.json", f"head of task {self.name!r}"))
        return self._head

    @property
    def prompt(self) -> str | None:
        """The prompt the task's texts are read through: a label-word head's; ``None`` for linear heads."""
        h = self.head
        return h.prompt if h is not None and h.kind == "label_words" else None

    @property
    def finished(self) -> bool:
        return bool(self.log)


class Run:
    """A base model and its tasks; see the module docstring for what the stages ask of it.

    Build it from a run directory with :meth:`open`, or directly from :class:`RunTask` entries.
    """

    def __init__(self, root, base_model: str, scope: str, tasks: dict[str, RunTask], config: dict | None = None,
                 study: dict | None = None, sources: dict | None = None):
        self.root = Path(root)
        self.base_model = str(base_model)
        self.scope = scope
        self.tasks = dict(tasks)
        self.config = dict(config or {})
        self.study = study  # the study (taskvec.study) this run was built from; None for a taskvec run
        self.sources = dict(sources or {})  # a study's checkpoints: {task: {"model": path, "kind": ...}}
        self._tokenizer = None

    @property
    def kind(self) -> str:
        """``"run"`` (fine-tuned by taskvec) or ``"study"`` (checkpoints made elsewhere, :mod:`taskvec.study`)."""
        return "study" if self.study is not None else "run"

    def description(self) -> dict:
        """What ``run.json`` holds: ``{"base_model", "scope", "tasks", "config"}`` (+ ``kind``, ``study`` and
        the checkpoints, ``sources``, for a study)."""
        d = {"base_model": self.base_model, "scope": self.scope, "tasks": self.names, "config": self.config}
        if self.study is not None:
            d |= {"kind": "study", "study": self.study,
                  "sources": self.sources or {t: {"model": str(rt.model_dir or rt.adapter_dir),
                                                  "kind": "adapter" if rt.adapter_dir else "model"}
                                              for t, rt in self.tasks.items()}}
        return d

    def kernel_params(self, keys=None) -> str:
        """The eNTK's parameter selection for this run: its scope, or — for LoRA runs and studies, whose
        vectors need not share one scope — exactly the tensors the task vectors change (``keys``, default:
        those of the saved vectors), as a ``re:`` scope."""
        if self.scope != "lora" and self.study is None:
            return self.scope
        if keys is None:
            keys = sorted(set().union(*[v.deltas for v in self.vectors().values()]))
        # names may carry a wrapper's prefix (a TaskModel's "backbone."): anchored at a component boundary
        return "re:(^|\\.)(" + "|".join(k.replace(".", "\\.") for k in keys) + ")$"

    # --- reading a run directory ------------------------------------------------------------------------

    @classmethod
    def open(cls, path, require: str = "finetune") -> Run:
        """Read ``path``'s ``run.json`` and task directories.

        ``require``: ``"run"`` (only ``run.json``), ``"finetune"`` (every task fine-tuned: ``log.json``,
        ``split.json``, ``head.json``) or ``"vectors"`` (and every task vector extracted). Raises
        :class:`RunError` naming the first missing file and the command that makes it.
        """
        root = Path(path)
        if not root.is_dir():
            raise RunError(f"{root} is not a directory (expected a taskvec run: `taskvec finetune ... --out {root}`)")
        if not (root / RUN_FILE).is_file():
            raise RunError(f"{root} is not a taskvec run directory (no {RUN_FILE})")
        meta = _read_json(root / RUN_FILE, "the run's description")
        missing = [k for k in ("base_model", "tasks") if k not in meta]
        if missing:
            raise RunError(f"{root / RUN_FILE} has no {', '.join(missing)}")
        if not isinstance(meta["tasks"], list) or not all(isinstance(t, str) and t for t in meta["tasks"]):
            raise RunError(f"{root / RUN_FILE}: 'tasks' must be a list of task names, got {meta['tasks']!r}")
        config = meta.get("config") or {}
        sources = meta.get("sources") or {}
        tasks = {name: _read_task(root, name, require, config, sources.get(name)) for name in meta["tasks"]}
        return cls(root, meta["base_model"], meta.get("scope", config.get("scope", "qkv")), tasks, config,
                   study=meta.get("study"), sources=sources)

    @property
    def names(self) -> list[str]:
        """Task names, in the run's order."""
        return list(self.tasks)

    def task(self, name: str) -> RunTask:
        try:
            return self.tasks[name]
        except KeyError:
            raise RunError(f"task {name!r} is not in run {self.root}; its tasks: {', '.join(self.tasks)}") from None

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r}, base={self.base_model!r}, scope={self.scope!r}, tasks={self.names})"

    # --- models -----------------------------------------------------------------------------------------

    def tokenizer(self):
        """The base model's tokenizer (loaded once)."""
        if self._tokenizer is None:
            from .modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.base_model)
        return self._tokenizer

    def backbone(self, device=None, attn_implementation: str | None = "eager"):
        """A fresh copy of the base backbone θ0 (eager attention: forward-mode AD needs it)."""
        from .modeling import load_backbone

        bb = load_backbone(self.base_model, attn_implementation=attn_implementation)
        return bb.to(device) if device is not None else bb

    def base_task_model(self, name: str, backbone=None, device=None):
        """θ0 for task ``name``: the base backbone (or ``backbone``, e.g. one shared by every task) with the
        task's own head, in eval mode."""
        from .modeling import load_task_model

        rt = self.task(name)
        if rt.head_dir is None:
            raise RunError(f"task {name!r} of {self.root} has no head")
        if backbone is None:
            backbone = self.backbone(device)
        m = load_task_model(rt.head_dir, backbone=backbone).eval()
        return m.to(device) if device is not None else m

    def finetuned_model(self, name: str, device=None):
        """The fine-tuned task model: its saved (or, in a study, its checkpoint's) backbone and its head;
        θ0 + τ for a LoRA adapter."""
        from .modeling import load_task_model

        rt = self.task(name)
        if rt.model_dir is None and rt.adapter_dir is None:
            raise RunError(f"task {name!r} of {self.root} has no fine-tuned model directory")
        if rt.model_dir is None:
            m = self.vector(name).apply_to(self.base_task_model(name))
        elif (rt.head_dir / "model").is_dir():
            m = load_task_model(rt.head_dir)
        else:
            m = load_task_model(rt.head_dir, backbone=rt.model_dir)
        m = m.eval()
        return m.to(device) if device is not None else m

    # --- task vectors -----------------------------------------------------------------------------------

    def vector_path(self, name: str) -> Path:
        p = self.task(name).vector_path
        return p if p is not None else self.stage_dir("vectors") / f"{name}.safetensors"

    def has_vector(self, name: str) -> bool:
        return self.vector_path(name).is_file()

    def vector(self, name: str):
        """Task ``name``'s :class:`~taskvec.task_vector.TaskVector` (``vectors/<task>.safetensors``)."""
        from .task_vector import TaskVector

        p = self.vector_path(name)
        if not p.is_file():
            raise RunError(f"{self.root}: no task vector for {name!r} ({p} is missing); "
                           f"run `taskvec vectors {self.root}` first")
        return TaskVector.load(p)

    def vectors(self, names=None) -> dict:
        """``{task: TaskVector}``, checked to share one base model and one scope."""
        names = self.names if names is None else list(names)
        vs = {t: self.vector(t) for t in names}
        fps = {v.base_fingerprint for v in vs.values()}
        if len(fps) > 1:
            raise RunError(f"task vectors of {self.root} come from different base models: {sorted(fps)}")
        scopes = {v.scope for v in vs.values()}
        if len(scopes) > 1 and self.study is None:  # a study may mix full fine-tunes and LoRA adapters
            raise RunError(f"task vectors of {self.root} have different scopes: {sorted(scopes)}")
        return vs

    # --- examples and batches ---------------------------------------------------------------------------

    def sample(self, name: str, split: str, n: int | None, seed: int = 0) -> list[int]:
        """``n`` example indices (into the task's data) from ``split`` (train | val | test), sorted.

        One ``numpy.random.default_rng(seed)`` permutes the splits in :data:`SAMPLE_ORDER`; the subset is
        the first ``n`` of its split's permutation (``None``: the whole split).
        """
        if split not in SAMPLE_ORDER:
            raise RunError(f"split {split!r}: valid: {', '.join(SAMPLE_ORDER)}")
        splits = self.task(name).splits
        if splits is None:
            raise RunError(f"task {name!r} of {self.root} has no split yet (not fine-tuned)")
        rng = np.random.default_rng(seed)
        for s in SAMPLE_ORDER:
            perm = rng.permutation(np.asarray(getattr(splits, s), dtype=np.int64))
            if s == split:
                return sorted(perm[:n].tolist() if n is not None else perm.tolist())
        raise AssertionError(split)

    def holdout(self, name: str, n_eval: int, n: int | None = None, seed: int = 0) -> list[int]:
        """Test examples of task ``name`` disjoint from :meth:`sample` ``(name, "test", n_eval, seed)``: the next
        ``n`` of the same permutation (``None``: all the rest), sorted — examples the predictor did not see."""
        splits = self.task(name).splits
        if splits is None:
            raise RunError(f"task {name!r} of {self.root} has no split yet (not fine-tuned)")
        perm = np.random.default_rng(seed).permutation(np.asarray(splits.test, dtype=np.int64))
        assert SAMPLE_ORDER[0] == "test"  # sample() draws the test permutation first from the same generator
        return sorted((perm[n_eval:] if n is None else perm[n_eval:n_eval + n]).tolist())

    def holdout_batches(self, name: str, n_eval: int | None, n: int | None = None, seed: int = 0,
                        batch_size: int = 64):
        """:meth:`holdout` examples, batched in length order (held-out evaluation)."""
        return self.batches(name, self.holdout(name, n_eval, n, seed), batch_size, sort_by_length=True)

    def batches(self, name: str, indices, batch_size: int = 64, sort_by_length: bool = False,
                max_length: int | None = None):
        """Tokenised :class:`~taskvec.tasks.Batches` of task ``name``'s examples ``indices``, read through the
        task's prompt, truncated at the run's ``max_length`` (or ``max_length``)."""
        from .tasks import Batches

        rt = self.task(name)
        return Batches(self.tokenizer(), rt.task, indices, batch_size,
                       max_length=rt.max_length if max_length is None else max_length, prompt=rt.prompt,
                       sort_by_length=sort_by_length)

    def eval_batches(self, name: str, n: int | None, seed: int = 0, batch_size: int = 64):
        """``n`` seeded test examples of task ``name``, batched in length order (evaluation)."""
        return self.batches(name, self.sample(name, "test", n, seed), batch_size, sort_by_length=True)

    def kernel_batches(self, name: str, n: int | None, seed: int = 0, batch_size: int = 64,
                       max_length: int | None = None):
        """``n`` seeded training examples of task ``name``, in index order (eNTK inputs)."""
        return self.batches(name, self.sample(name, "train", n, seed), batch_size, max_length=max_length)

    # --- stage outputs ----------------------------------------------------------------------------------

    def stage_dir(self, stage: str) -> Path:
        """Where ``stage`` (finetune, vectors, ntk, merge, validate, report) writes inside the run."""
        return stage_path(self.root, stage)

    def finetune_logs(self) -> dict[str, dict]:
        """``{task: log.json}`` of the finished tasks."""
        return {t: rt.log for t, rt in self.tasks.items() if rt.log}

    def cache_path(self, kind: str, key: dict) -> Path | None:
        """Where a cached computation over this run's fine-tuned tasks lives,
        ``RUN/cache/<kind>-<hash>.safetensors``: the hash covers ``key`` (JSON) and every task vector file's
        size and modification time, so re-fine-tuning a task (its vector rewritten) invalidates it. ``None``
        for a run whose vectors are not all on disk (built in memory)."""
        import hashlib

        files = [self.vector_path(t) for t in self.names]
        if not all(f.is_file() for f in files):
            return None
        stamp = [(str(f.name), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        h = hashlib.sha256(json.dumps([key, stamp], sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.root / CACHE_DIR / f"{kind}-{h}.safetensors"

    def read_stage_json(self, stage: str, name: str) -> dict | None:
        """A stage's saved JSON result (``None`` when the stage has not run)."""
        p = self.stage_dir(stage) / name
        return _read_json(p, f"{stage} results") if p.is_file() else None

    def ntk_results(self) -> dict | None:
        """The ntk stage's results: ``{"summary": {task: ...}, "spectra": {task: SpectrumReport JSON},
        "figures": [paths of its PNG figures]}``, or ``None`` when the stage has not run."""
        summary = self.read_stage_json("ntk", "summary.json")
        if summary is None:
            return None
        spectra = {t: self.read_stage_json("ntk", f"{t}.spectrum.json") for t in summary}
        figures = [str(p) for p in sorted(self.stage_dir("ntk").glob("*.png"))]
        return {"summary": summary, "spectra": {t: s for t, s in spectra.items() if s is not None},
                "figures": figures}

    def validation_results(self) -> dict | None:
        return self.read_stage_json("validate", "results.json")

    def lm_validation_results(self) -> dict | None:
        """``RUN/validation/lm_results.json`` of an LM run (:func:`taskvec.lm_validate.validate_lm_run`)."""
        return self.read_stage_json("validate", "lm_results.json")


def _read_task(root: Path, name: str, require: str, config: dict, source: dict | None = None) -> RunTask:
    """One task's entry of a run directory (see :meth:`Run.open` for ``require``); ``source``: a study
    task's checkpoint (``{"model": path, "kind": "model" | "adapter" | "run"}``; it has no fine-tuning log)."""
    from .tasks import Splits

    d = root / STAGE_DIRS["finetune"] / name
    need = require != "run"
    for f in ("split.json", "head.json") if source else ("split.json", "log.json", "head.json"):
        if need and not (d / f).is_file():
            raise RunError(f"task {name!r} of {root} has not finished fine-tuning ({d / f} is missing); "
                           f"run `taskvec finetune` (or `taskvec run`) into {root} first")
    log_ = _read_json(d / "log.json", f"fine-tuning log of task {name!r}") if (d / "log.json").is_file() else {}
    splits = (Splits.from_json(_read_json(d / "split.json", f"split of task {name!r}"))
              if (d / "split.json").is_file() else None)
    vec = root / STAGE_DIRS["vectors"] / f"{name}.safetensors"
    if require == "vectors" and not vec.is_file():
        raise RunError(f"{root}: no task vector for {name!r} ({vec} is missing); run `taskvec vectors {root}` first")
    model_dir = d / "model" if (d / "model").is_dir() else None
    adapter_dir = d / "adapter" if (d / "adapter").is_dir() else None
    if source and source["kind"] == "run":  # a task of a taskvec run: its task-model directory
        src = Path(source["model"])
        model_dir = src / "model" if (src / "model").is_dir() else None
        adapter_dir = src / "adapter" if (src / "adapter").is_dir() else None
    elif source:
        model_dir, adapter_dir = (None, Path(source["model"])) if source["kind"] == "adapter" \
            else (Path(source["model"]), None)
    return RunTask(name, splits, head_dir=d if (d / "head.json").is_file() else None,
                   model_dir=model_dir, adapter_dir=adapter_dir, vector_path=vec,
                   task_file=d / "task.json" if (d / "task.json").is_file() else None, log=log_,
                   max_length=int((log_.get("config") or config).get("max_length", 128)))


def open_run(path, require: str = "finetune") -> Run:
    """:meth:`Run.open` (a run directory) — or a :class:`Run` passed through unchanged."""
    return path if isinstance(path, Run) else Run.open(path, require=require)


def device_of(device) -> torch.device:
    """``device`` or the default: CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def stage_path(root, stage: str) -> Path:
    """Where ``stage`` writes inside the run directory ``root`` (before a :class:`Run` can be opened)."""
    try:
        return Path(root) / STAGE_DIRS[stage]
    except KeyError:
        raise RunError(f"unknown stage {stage!r}; valid: {', '.join(STAGE_DIRS)}") from None


# --- what the fine-tuning stage writes (it creates the run, so it cannot open one first) ------------------


def run_file(root) -> Path:
    """``RUN/run.json``: the run's description, written by :func:`taskvec.finetune.finetune`."""
    return Path(root) / RUN_FILE


def task_dir(root, name: str) -> Path:
    """``RUN/finetune/<task>/``: the task's fine-tuned model, head, log and split."""
    return stage_path(root, "finetune") / name


def read_description(root) -> dict | None:
    """The saved ``run.json`` of ``root`` (``None`` when there is none yet)."""
    p = run_file(root)
    return _read_json(p, "the run's description") if p.is_file() else None


def finished_log(root, name: str) -> dict | None:
    """The fine-tuning log of task ``name`` when the task has finished (``None`` otherwise)."""
    p = task_dir(root, name) / "log.json"
    return _read_json(p, f"fine-tuning log of task {name!r}") if p.is_file() else None


def write_study(root, record: dict, tasks: dict, max_length: int, overwrite: bool = False) -> Path:
    """Write a checked study (:func:`taskvec.study.prepare_study`) as a run directory.

    ``tasks``: ``{name: {"task": Task, "splits": Splits, "head": (HeadSpec, state), "vector": TaskVector,
    "source": {"model": path, "kind": "model" | "adapter"}}}``. Layout: ``run.json`` (with ``study`` and
    ``sources``), ``finetune/<task>/{head.json, head.safetensors, split.json, task.json}``,
    ``vectors/<task>.safetensors`` — what :meth:`Run.open` reads. Each task directory and vector is written
    atomically and ``run.json`` last, so an interrupted write leaves no directory that opens as a study.
    """
    from .checkpoint_heads import write_head
    from .io import atomic_dir, write_json
    from .tasks import save_task

    import shutil

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if run_file(root).exists():  # replacing a study (overwrite): its stage outputs go with it
        run_file(root).unlink()  # first: not a study until the new run.json is written
        for stage in STAGE_DIRS:
            shutil.rmtree(stage_path(root, stage), ignore_errors=True)
        shutil.rmtree(root / CACHE_DIR, ignore_errors=True)
        (root / "results.json").unlink(missing_ok=True)
    for name, t in tasks.items():
        with atomic_dir(task_dir(root, name), overwrite=True) as d:
            write_head(d, *t["head"])
            write_json(d / "split.json", t["splits"].to_json())
            save_task(t["task"], d / "task.json")
        t["vector"].save(stage_path(root, "vectors") / f"{name}.safetensors", overwrite=True)
    scopes = sorted({t["vector"].scope for t in tasks.values()})
    write_json(run_file(root), {"base_model": record["base_model"], "scope": record["scope"], "tasks": list(tasks),
                                "config": {"max_length": max_length, "seed": record["seed"], "vector_scopes": scopes},
                                "kind": "study", "study": record,
                                "sources": {n: t["source"] for n, t in tasks.items()}})
    return root
