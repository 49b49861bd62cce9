"""The ``taskvec`` command: a thin layer over the Python API (every command is a few API calls).

Commands: ``models``, ``tasks``, ``finetune``, ``vectors``, ``ntk``, ``merge``, ``validate``, ``report``, ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from .finetune import FinetuneConfig

    d = FinetuneConfig()
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--scope", default=d.scope, help="full | attention | qkv | q | v | qv | ... | lora | re:<regex>")
    g.add_argument("--head", default=d.head, choices=["auto", "probe", "label_words", "random"])
    g.add_argument("--train-head", action="store_true", help="also train the task head (default: frozen)")
    g.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd"])
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--max-steps", type=int, default=d.max_steps)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--schedule", default=d.schedule, choices=["constant", "linear"])
    g.add_argument("--loss", default=d.loss, choices=["ce", "mse"])
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluation interval (steps)")
    g.add_argument("--early-stopping", default=",".join(d.early_stopping),
                   help="comma-separated rules: patience, spectral, or none")
    g.add_argument("--rule-arg", action="append", default=[], metavar="RULE.KEY=VALUE",
                   help="keyword argument of a stopping rule, e.g. spectral.max_examples=256 (repeatable)")
    g.add_argument("--patience", type=int, default=d.patience)
    g.add_argument("--min-delta", type=float, default=d.min_delta)
    g.add_argument("--metric", default=d.metric, choices=["val_loss", "val_accuracy"])
    g.add_argument("--max-length", type=int, default=d.max_length)
    g.add_argument("--max-train", type=int, default=d.max_train, help="cap on training examples per task")
    g.add_argument("--test-size", type=int, default=d.test_size)
    g.add_argument("--val-size", type=int, default=d.val_size)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--lora-r", type=int, default=d.lora_r)
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    g.add_argument("--lora-targets", default=None, help="comma-separated module names (default: Q and V)")
    g.add_argument("--rslora", action="store_true")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: accelerate's choice)")


def _finetune_config(a):
    from .finetune import FinetuneConfig

    return FinetuneConfig(
        scope=a.scope, head=a.head, train_head=a.train_head, optimizer=a.optimizer, lr=a.lr,
        weight_decay=a.weight_decay, batch_size=a.batch_size, max_steps=a.max_steps, warmup_steps=a.warmup_steps,
        schedule=a.schedule, loss=a.loss, eval_every=a.eval_every, early_stopping=a.early_stopping,
        patience=a.patience, min_delta=a.min_delta, metric=a.metric, max_length=a.max_length,
        max_train=a.max_train, test_size=a.test_size, val_size=a.val_size, seed=a.seed, lora_r=a.lora_r,
        lora_alpha=a.lora_alpha, lora_targets=a.lora_targets.split(",") if a.lora_targets else None,
        use_rslora=a.rslora, device=a.device, rule_args=_rule_args(a.rule_arg))


def _rule_args(items: list[str]) -> dict:
    import yaml

    out: dict = {}
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


def cmd_vectors(a) -> int:
    from .finetune import extract_vectors
    from .task_vector import TaskVector

    vs = extract_vectors(a.run, overwrite=a.overwrite)
    names = list(vs)
    for n in names:
        print(f"{n}: {vs[n]!r} -> {Path(a.run) / 'vectors' / (n + '.safetensors')}")
    if len(names) > 1:
        m = TaskVector.cosine_matrix(vs.values())
        print("cosine similarity:")
        print(" " * 18 + " ".join(f"{n[:10]:>10s}" for n in names))
        for i, n in enumerate(names):
            print(f"{n[:16]:16s}  " + " ".join(f"{m[i, j]:10.4f}" for j in range(len(names))))
    return 0


def cmd_merge(a) -> int:
    from .merge import merge

    res = merge(a.config, a.out, overwrite=a.overwrite, device=a.device, dtype=a.dtype,
                show_progress=not a.no_progress, write_mergekit=a.write_mergekit)
    print(f"merged {res.tensors_merged} tensors ({res.method}) into {res.out_dir} in {res.seconds:.1f} s"
          + (f"; heads: {', '.join(res.heads)}" if res.heads else ""))
    return 0


def cmd_ntk(a) -> int:
    from .ntk import run_ntk

    res = run_ntk(a.run, out=a.out, n=a.n, params=a.params, mode=a.mode, output=a.output, kernel=a.kernel,
                  cross=not a.no_cross, sketch_dim=a.sketch_dim, seed=a.seed, device=a.device)
    print(json.dumps(res, indent=2, default=str))
    return 0


def cmd_validate(a) -> int:
    from .interference import validate_run
    from .report import summary_markdown

    res = validate_run(a.run, n_eval=a.n_eval, n_kernel=a.n_kernel, rank=a.rank,
                       second_order=not a.first_order, max_uncertainty=a.max_uncertainty, device=a.device)
    print(summary_markdown({"validation": res}))
    return 0


def cmd_report(a) -> int:
    from .report import write_report

    print(f"report written to {write_report(a.run)}")
    return 0


def cmd_run(a) -> int:
    from .pipeline import run_pipeline

    run_pipeline(a.config, a.out, overwrite=a.overwrite, stages=a.stages.split(",") if a.stages else None)
    return 0


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
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("vectors", help="extract task vectors from a fine-tuning run")
    s.add_argument("run", help="run directory written by `taskvec finetune`")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_vectors)

    s = sub.add_parser("ntk", help="empirical NTK and spectra of a run's tasks")
    s.add_argument("run")
    s.add_argument("--out", default=None, help="output folder (default RUN/ntk)")
    s.add_argument("--n", type=int, default=512, help="training examples per task")
    s.add_argument("--params", default="qkv", help="scope or re:<regex> of the parameters")
    s.add_argument("--mode", default="exact", choices=["exact", "sketch", "reference"])
    s.add_argument("--output", default="logits", choices=["logits", "margin", "loss"])
    s.add_argument("--kernel", default="full", choices=["full", "trace", "diagonal"])
    s.add_argument("--no-cross", action="store_true", help="skip the cross-task kernels")
    s.add_argument("--sketch-dim", type=int, default=8192)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_ntk)

    s = sub.add_parser("merge", help="merge checkpoints from a YAML config (taskvec or mergekit format)")
    s.add_argument("config")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--dtype", default=None, help="output dtype: float32, bfloat16, float16")
    s.add_argument("--write-mergekit", action="store_true", help="also write OUT/mergekit.yaml")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("validate", help="predict merges from the linearised model, measure them, explain them")
    s.add_argument("run")
    s.add_argument("--n-eval", type=int, default=500, help="evaluation examples per task")
    s.add_argument("--n-kernel", type=int, default=128, help="kernel examples per task (eigenspaces)")
    s.add_argument("--rank", type=int, default=20, help="r of the top-r eigenspaces")
    s.add_argument("--max-uncertainty", type=float, default=1.0,
                   help="trust threshold: a prediction is trusted when at most this many accuracy points of its "
                        "examples could flip under the neglected higher-order terms")
    s.add_argument("--first-order", action="store_true", help="skip the second-order term (no trust signal: every prediction is flagged)")
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("report", help="write RUN/report/report.html (+ PNG figures) and RUN/results.json")
    s.add_argument("run")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("run", help="the whole pipeline from a YAML config ('default' = the packaged one)")
    s.add_argument("config", nargs="?", default="default")
    s.add_argument("--out", default="runs/default")
    s.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_run)
    return p


def main(argv=None) -> int:
    from .errors import TaskvecError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TaskvecError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"taskvec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "fields", "main"]
