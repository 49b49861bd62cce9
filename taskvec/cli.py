"""The ``taskvec`` command: a thin layer over the Python API (every command is a few API calls).

Commands: ``models``, ``tasks``, ``finetune``, ``vectors``, ``ntk``, ``merge``, ``validate``, ``report``, ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields


def _none_or(conv):
    """argparse ``type`` of an ``X | None`` field: ``none`` (any case) is ``None``, anything else ``conv(text)``."""
    def parse(text: str):
        return None if text.lower() == "none" else conv(text)

    parse.__name__ = conv.__name__  # argparse names the type in its error messages
    return parse


def _items(conv):
    """argparse ``type`` of one value of a ``list[X]`` field: comma-separated items, ``none`` = no item."""
    def parse(text: str) -> list:
        return [conv(x) for x in text.split(",") if x and x.lower() != "none"]

    parse.__name__ = conv.__name__
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _finetune_fields() -> list[tuple]:
    """``(field, type, optional)`` for every :class:`FinetuneConfig` field: its annotation resolved, with
    ``X | None`` as ``(X, True)``."""
    import typing

    from .finetune import FinetuneConfig

    hints = typing.get_type_hints(FinetuneConfig)
    out = []
    for f in fields(FinetuneConfig):
        tp, args = hints[f.name], typing.get_args(hints[f.name])
        optional = type(None) in args and typing.get_origin(tp) is not list
        if optional:
            tp = next(t for t in args if t is not type(None))
        out.append((f, tp, optional))
    return out


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`FinetuneConfig` field, generated from the dataclass: ``--field-name`` (and the
    spellings in ``metadata["flags"]``), typed from the annotation, help from ``metadata["help"]``, default
    the field's default (shown). ``bool`` → ``--flag/--no-flag``; ``X | None`` also takes ``none``;
    ``list[X]`` → one or more values, each possibly comma-separated (``--early-stopping patience,spectral``,
    ``none`` = empty); ``dict`` (``rule_args``) → a JSON object, plus the repeatable ``--rule-arg
    RULE.KEY=VALUE``."""
    import typing

    g = p.add_argument_group("fine-tuning (the fields of taskvec.finetune.FinetuneConfig)")
    for f, tp, optional in _finetune_fields():
        default = f.default_factory() if callable(f.default_factory) else f.default
        names = [f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ())]
        kw = {"dest": f.name, "default": default,
              "help": f"{f.metadata.get('help', '')} (default: {_shown(default)})".replace("%", "%%")}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if tp is bool:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            item = typing.get_args(tp)[0]
            g.add_argument(*names, nargs="+", type=_items(item),
                           metavar=f.metadata.get("metavar", item.__name__.upper()), **kw)
        elif tp is dict or typing.get_origin(tp) is dict:
            g.add_argument(*names, type=_json_object, metavar="JSON", **kw)
            if f.name == "rule_args":
                g.add_argument("--rule-arg", action="append", default=[], metavar="RULE.KEY=VALUE",
                               help="one keyword argument of a stopping rule, e.g. spectral.max_examples=256 "
                                    "(repeatable; applied over --rule-args)")
        else:
            g.add_argument(*names, type=_none_or(tp) if optional else tp, **kw)


def _finetune_config(a):
    """The :class:`FinetuneConfig` of flags parsed by :func:`_add_finetune_args`."""
    import typing

    from .finetune import FinetuneConfig

    kw = {}
    for f, tp, _ in _finetune_fields():
        value = getattr(a, f.name)
        if typing.get_origin(tp) is list and value and isinstance(value[0], list):  # given: a list per value
            value = [x for v in value for x in v]
            if not value and f.default is None:  # e.g. --lora-targets none
                value = None
        kw[f.name] = value
    kw["rule_args"] = _rule_args(getattr(a, "rule_arg", []), kw["rule_args"])
    return FinetuneConfig(**kw)


def _rule_args(items: list[str], base: dict | None = None) -> dict:
    import yaml

    out: dict = {k: dict(v) for k, v in (base or {}).items()}
    for it in items:
        key, sep, value = it.partition("=")
        rule, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--rule-arg {it!r}: expected RULE.KEY=VALUE, e.g. spectral.max_examples=256")
        out.setdefault(rule, {})[name] = yaml.safe_load(value)
    return out


def cmd_models(a) -> int:
    from .modeling import DEFAULT_MODEL, MODELS

    for k, v in MODELS.items():
        print(f"{k:10s} {v}{'  [default]' if k == DEFAULT_MODEL else ''}")
    return 0


def cmd_tasks(a) -> int:
    from .tasks import DEFAULT_TASKS, load_task, task_names

    for n in task_names():
        line = n
        if a.stats:
            t = load_task(n)
            line += f": {len(t)} examples, classes {t.label_names}"
        print(line + ("  [default]" if n in DEFAULT_TASKS else ""))
    return 0


def cmd_finetune(a) -> int:
    from .finetune import finetune, results_table
    from .tasks import DEFAULT_TASKS

    res = finetune(a.model, a.tasks or DEFAULT_TASKS, a.out, _finetune_config(a), overwrite=a.overwrite)
    print(results_table(res))
    return 0


def _locked(path, command: str):
    """The output lock (:func:`taskvec.io.run_lock`) of a command writing into ``path`` (a run directory, a
    study's directory or a merge's output): a second taskvec process writing there is refused, naming this
    one."""
    from .io import run_lock

    return run_lock(path, f"taskvec {command}")


def cmd_vectors(a) -> int:
    from .runs import open_run
    from .stages.vectors import extract_vectors
    from .task_vector import TaskVector

    with _locked(a.run, "vectors"):
        run = open_run(a.run)
        vs = extract_vectors(run, overwrite=a.overwrite)
    names = list(vs)
    for n in names:
        print(f"{n}: {vs[n]!r} -> {run.vector_path(n)}")
    if len(names) > 1:
        m = TaskVector.cosine_matrix(vs.values())
        print("cosine similarity:")
        print(" " * 18 + " ".join(f"{n[:10]:>10s}" for n in names))
        for i, n in enumerate(names):
            print(f"{n[:16]:16s}  " + " ".join(f"{m[i, j]:10.4f}" for j in range(len(names))))
    return 0


def cmd_merge(a) -> int:
    from .merge import merge

    with _locked(a.out, "merge"):
        res = merge(a.config, a.out, overwrite=a.overwrite, device=a.device, dtype=a.dtype,
                    show_progress=not a.no_progress, write_mergekit=a.write_mergekit)
    print(f"merged {res.tensors_merged} tensors ({res.method}) into {res.out_dir} in {res.seconds:.1f} s"
          + (f"; heads: {', '.join(res.heads)}" if res.heads else ""))
    return 0


def _run_or_study(a, out_flag: str = "out"):
    """The command's RUN argument: a run directory, or a study YAML prepared into ``--out`` (or
    ``--study-out``) first (:func:`taskvec.study.prepare_study`); returns ``(run, stage_out)``."""
    from .study import StudyError, is_study, prepare_study

    if not is_study(a.run):
        return a.run, getattr(a, out_flag, None)
    out = getattr(a, out_flag, None)
    if out is None:
        raise StudyError(f"{a.run} is a study: give --{out_flag.replace('_', '-')} DIR, the directory its "
                         "kernels, predictions and report go to")
    return prepare_study(a.run, out), None


def _locked_run(a):
    """The lock of the run a command reads and writes into: the run directory, or a study's ``--out``."""
    from .study import is_study

    return _locked(a.out if is_study(a.run) and a.out is not None else a.run, a.command)


def cmd_ntk(a) -> int:
    from .stages.ntk import run_ntk

    with _locked_run(a):
        run, out = _run_or_study(a)
        res = run_ntk(run, out=out, n=a.n, params=a.params, mode=a.mode, output=a.output, kernel=a.kernel,
                      cross=not a.no_cross, sketch_dim=a.sketch_dim, seed=a.seed, device=a.device,
                      max_length=a.max_length, overwrite=a.overwrite)
    print(json.dumps(res, indent=2, default=str))
    return 0


def _validate_lm(a, run, out) -> int:
    """``taskvec validate`` of a run of causal-LM tasks: predictions and measurements in nats per token."""
    from .lm_validate import run_path, validate_lm_run

    res = validate_lm_run(run, out=out, n_eval=a.n_eval or 60, second_order=not a.first_order,
                          max_uncertainty=0.05 if a.max_uncertainty is None else a.max_uncertainty,
                          predictor=a.predictor, n_probe=a.n_probe, max_memory=a.max_memory, device=a.device,
                          overwrite=a.overwrite)
    s = res["summary"]
    for where in ("eval", "heldout"):
        e = s[where]
        print(f"{where}: Spearman predicted vs measured mean-NLL change {e['spearman']} (Taylor alone "
              f"{e['spearman_taylor']}), MAE {e['mae_all']:.3f} nats/token, trusted {e['n_trusted']}")
    c = res["coefficients"]
    print(f"prediction-chosen λ* = {c['lambda_star']:g}: measured {c['measured_avg_at_lambda_star']['eval']:+.3f} "
          f"nats/token; measured grid best λ = {c['grid_best_lambda']}: {c['grid_best_avg']:+.3f}")
    print(f"wrote {out or run_path(run)}")
    if a.write_best:
        from .lm_best import write_best

        merged, cand = write_best(run, a.write_best, res, overwrite=a.overwrite, device=a.device or "cpu")
        print(f"wrote the recommended merge ({cand['name']}: measured {cand['measured']:+.3f} nats per token "
              f"average change) to {merged.out_dir}")
    return 0


def cmd_validate(a) -> int:
    from .errors import TaskvecError
    from .report import summary_markdown
    from .validation import validate_run

    with _locked_run(a):
        run, out = _run_or_study(a)
        if a.write_best:  # refused before the (long) validation, not after it
            from .io import check_output

            check_output(a.write_best, a.overwrite)
        from .lm_validate import is_lm_run
        from .runs import RunError

        try:
            lm = is_lm_run(run)
        except RunError:  # not a finished run: validate_run says what is missing
            lm = False
        if lm:
            return _validate_lm(a, run, out)
        if a.predictor != "loglik" or a.max_memory is not None:
            raise TaskvecError("--predictor and --max-memory apply to runs of causal-LM tasks only")
        res = validate_run(run, out=out, n_eval=a.n_eval or 500, n_kernel=a.n_kernel, rank=a.rank,
                           second_order=not a.first_order,
                           max_uncertainty=1.0 if a.max_uncertainty is None else a.max_uncertainty, device=a.device,
                           overwrite=a.overwrite, n_probe=a.n_probe, probe_max_uncertainty=a.probe_max_uncertainty,
                           precision=a.precision)
        print(summary_markdown({"validation": res}))
        if a.write_best:
            from .validation.best import write_best

            merged, cand = write_best(run, a.write_best, res, overwrite=a.overwrite, device=a.device or "cpu")
            print(f"wrote the recommended merge ({cand['name']}: measured {100 * cand['measured']:.2f}%, predicted "
                  f"{100 * cand['predicted']:.2f}% average normalised accuracy) to {merged.out_dir}")
    return 0


def cmd_report(a) -> int:
    from .report import write_report

    with _locked(a.run, "report"):
        page = write_report(a.run, overwrite=a.overwrite)
    print(f"report written to {page}")
    return 0


def cmd_run(a) -> int:
    from .pipeline import run_pipeline

    run_pipeline(a.config, a.out, overwrite=a.overwrite, stages=a.stages.split(",") if a.stages else None)
    return 0


def _add_allow_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="load model directories that hold only pickle weights (pytorch_model.bin) with "
                        "torch.load(weights_only=True) instead of refusing them (taskvec.modeling.pickle_allowed)")


def _add_validate_parser(sub) -> None:
    """`taskvec validate`: classification runs and studies, and runs of causal-LM tasks (nats per token)."""
    s = sub.add_parser("validate", help="predict merges from the linearised model, measure them, explain them")
    s.add_argument("run", help="run directory, or a study YAML (checkpoints made elsewhere; needs --out)")
    s.add_argument("--out", default=None, help="results file (default RUN/validation/results.json); for a study: "
                                              "the study's directory")
    s.add_argument("--n-eval", type=int, default=None,
                   help="evaluation examples per task (default 500; 60 for runs of causal-LM tasks)")
    s.add_argument("--n-kernel", type=int, default=128, help="kernel examples per task (eigenspaces)")
    s.add_argument("--rank", type=int, default=20, help="r of the top-r eigenspaces")
    s.add_argument("--max-uncertainty", type=float, default=None,
                   help="trust threshold: a prediction is trusted when at most this many accuracy points of its "
                        "examples could flip under the neglected higher-order terms (default 1.0); for causal-LM "
                        "tasks in nats per token (default 0.05)")
    s.add_argument("--predictor", choices=("loglik", "logits"), default="loglik",
                   help="causal-LM tasks: Taylor series of the log-likelihood itself (default) or the NLL of "
                        "the linearised next-token logits (both are reported)")
    s.add_argument("--max-memory", default=None,
                   help="causal-LM tasks: memory budget of the batched JVPs (bytes or e.g. 4GB; default 40%% "
                        "of available memory)")
    s.add_argument("--first-order", action="store_true", help="skip the second-order term (no trust signal: every prediction is flagged)")
    s.add_argument("--n-probe", type=int, default=None,
                   help="evaluation examples per task on which a merge whose Taylor prediction is flagged is "
                        "measured first, to calibrate the expansion (default n_eval/5, at most 100; 0: Taylor only)")
    s.add_argument("--probe-max-uncertainty", type=float, default=3.0,
                   help="trust threshold of the probe-calibrated predictions (points: two standard errors)")
    s.add_argument("--precision", choices=("float64", "float32"), default="float64",
                   help="precision of the finite differences of the predictions (float32: half the cost)")
    s.add_argument("--device", default=None)
    s.add_argument("--write-best", default=None, metavar="DIR",
                   help="also write the best measured merge as a merged model directory (heads, model card with "
                        "predicted and measured per-task numbers)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing RUN/validation/results.json (and --write-best DIR)")
    _add_allow_pickle(s)
    s.set_defaults(func=cmd_validate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taskvec", description="Fine-tune with early stopping, extract task vectors, "
                                "explain interference through the empirical NTK, and merge transformer checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list the embedded base models")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("tasks", help="list the bundled tasks")
    s.add_argument("--stats", action="store_true", help="load each task and print its size and classes")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("finetune", help="fine-tune the base on each task with early stopping")
    s.add_argument("--model", default="minilm", help="short name (minilm, smollm2) or a local HF directory")
    s.add_argument("--tasks", nargs="*", help="bundled task names or .csv/.jsonl paths (default: 4 bundled)")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--overwrite", action="store_true")
    _add_finetune_args(s)
    _add_allow_pickle(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("vectors", help="extract task vectors from a fine-tuning run")
    s.add_argument("run", help="run directory written by `taskvec finetune`")
    s.add_argument("--overwrite", action="store_true")
    _add_allow_pickle(s)
    s.set_defaults(func=cmd_vectors)

    s = sub.add_parser("ntk", help="empirical NTK and spectra of a run's (or a study's) tasks")
    s.add_argument("run", help="run directory, or a study YAML (then --out is the study's directory)")
    s.add_argument("--out", default=None, help="output folder (default RUN/ntk); for a study: its directory")
    s.add_argument("--n", type=int, default=512, help="training examples per task")
    s.add_argument("--params", default=None,
                   help="scope or re:<regex> of the parameters (default: the run's scope, or the tensors its task "
                        "vectors change)")
    s.add_argument("--mode", default="exact", choices=["exact", "sketch", "reference"])
    s.add_argument("--output", default="logits", choices=["logits", "margin", "loss"])
    s.add_argument("--kernel", default="full", choices=["full", "trace", "diagonal"])
    s.add_argument("--no-cross", action="store_true", help="skip the cross-task kernels")
    s.add_argument("--sketch-dim", type=int, default=8192)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the run's)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_allow_pickle(s)
    s.set_defaults(func=cmd_ntk)

    s = sub.add_parser("merge", help="merge checkpoints from a YAML config (taskvec or mergekit format)")
    s.add_argument("config")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--dtype", default=None, help="output dtype: float32, bfloat16, float16")
    s.add_argument("--write-mergekit", action="store_true", help="also write OUT/mergekit.yaml")
    s.add_argument("--no-progress", action="store_true")
    _add_allow_pickle(s)
    s.set_defaults(func=cmd_merge)

    _add_validate_parser(sub)

    s = sub.add_parser("report", help="write RUN/report/report.html (+ PNG figures) and RUN/results.json")
    s.add_argument("run")
    s.add_argument("--overwrite", action="store_true", help="replace an existing RUN/report/")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("run", help="the whole pipeline from a YAML config ('default' = the packaged one)")
    s.add_argument("config", nargs="?", default="default")
    s.add_argument("--out", default="runs/default")
    s.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    s.add_argument("--overwrite", action="store_true")
    _add_allow_pickle(s)
    s.set_defaults(func=cmd_run)
    return p


def _log_to_stderr() -> None:
    """The library logs through ``logging`` (logger ``taskvec``); the CLI shows its INFO messages."""
    import logging

    logger = logging.getLogger("taskvec")
    if not any(getattr(h, "_taskvec_cli", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._taskvec_cli = True
        logger.addHandler(h)
    logger.setLevel(logging.INFO)


def main(argv=None) -> int:
    from .errors import TaskvecError

    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        if getattr(args, "allow_pickle", False):  # every loader of this command accepts pickle weights
            from .modeling import pickle_allowed

            with pickle_allowed():
                return args.func(args)
        return args.func(args)
    except (TaskvecError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"taskvec {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: outputs are atomic, so nothing half-written was kept
        print(f"taskvec {args.command}: interrupted; no partial output was kept (run the same command again to "
              "resume)", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """An error's message on one line (a YAML parser's, say, spans several: its lines joined with ' | ')."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    return " | ".join(ln for ln in lines if ln and ln.strip("^ ")) or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "fields", "main"]
