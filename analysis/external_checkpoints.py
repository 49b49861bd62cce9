"""A study of checkpoints taskvec did not fine-tune (issue 12): MiniLM classifiers trained by a plain torch
loop and saved with ``save_pretrained``, and one peft LoRA adapter, explained and validated through
:mod:`taskvec.study`, with every claim checked on held-out test examples the predictor did not see.

1. **Checkpoints** (stage ``train``): for each task, ``AutoModelForSequenceClassification`` on MiniLM (its own
   pooler + classifier head, ``config.id2label`` = the task's labels), trained on the study's *training* split
   only (so no checkpoint saw an evaluation or held-out example): rotten_tomatoes with transformers'
   ``Trainer``, trec by a plain AdamW loop (both train W_Q, W_K, W_V and the head and are saved whole), and
   sms_spam as a peft LoRA adapter on query/value with ``modules_to_save`` = pooler + classifier.
2. **Study** (stage ``study``): ``OUT/study.yaml`` naming the checkpoints and the bundled tasks, then
   ``taskvec.study.prepare_study`` → ``taskvec.validate_run`` (predictions on ``n_eval`` test examples per
   task, measurements there and on ``n_holdout`` others) → ``taskvec report``.
3. Writes ``analysis/results/external_checkpoints_<device>.md`` (and ``OUT/summary.json``) from the run's
   own results: Spearman on held-out changes, trusted error there with the calibration table, the
   interference matrix, the prediction-chosen coefficients scored on the held-out subset against the λ grid.

    PYTHONUNBUFFERED=1 .venv/bin/python analysis/external_checkpoints.py --out runs/external
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"rotten_tomatoes": "trainer", "trec": "model", "sms_spam": "lora"}  # how each checkpoint is made
STUDY = {"seed": 0, "test_size": 500, "max_length": 128, "scope": "qkv"}


def _study_splits(name: str):
    """The study's own split of a bundled task (what prepare_study will compute: same seed and sizes)."""
    from taskvec.tasks import load_task, make_splits

    task = load_task(name)
    return task, make_splits(task, seed=STUDY["seed"], test_size=STUDY["test_size"], val_size=task.num_labels,
                             max_test_fraction=0.5)


def train_checkpoint(name: str, kind: str, dest: Path, steps: int, lr: float, batch_size: int = 16) -> dict:
    """Fine-tune MiniLM on the study's training split of ``name`` with a plain loop; save it at ``dest``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from taskvec.modeling import resolve_model

    base = resolve_model("minilm")
    task, splits = _study_splits(name)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=task.num_labels, id2label=dict(enumerate(task.label_names)),
        label2id={n: i for i, n in enumerate(task.label_names)})
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 modules_to_save=["classifier", "pooler"]))
    else:
        for n, p in model.named_parameters():
            p.requires_grad = any(k in n for k in ("attention.self.query", "attention.self.key",
                                                   "attention.self.value", "classifier", "pooler"))
    t0 = time.time()
    if kind == "trainer":  # transformers' own Trainer, as most checkpoints on the hub are made
        from transformers import Trainer, TrainingArguments

        class _Data(torch.utils.data.Dataset):
            def __len__(self):
                return len(splits.train)

            def __getitem__(self, i):
                j = splits.train[i]
                enc = tok(task.texts[j], truncation=True, max_length=STUDY["max_length"])
                return dict(enc, labels=task.labels[j])

        args = TrainingArguments(output_dir=str(dest) + ".trainer", max_steps=steps, learning_rate=lr,
                                 per_device_train_batch_size=batch_size, report_to="none", save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                                 lr_scheduler_type="constant")
        from transformers import DataCollatorWithPadding

        trainer = Trainer(model=model, args=args, train_dataset=_Data(), data_collator=DataCollatorWithPadding(tok))
        out = trainer.train()
        trainer.save_model(str(dest))
        tok.save_pretrained(dest)
        return {"task": name, "kind": kind, "steps": steps, "lr": lr, "seconds": time.time() - t0,
                "final_loss": float(out.training_loss)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.default_rng(0)
    train = np.asarray(splits.train)
    model.train()
    for _ in range(steps):
        idx = rng.choice(train, size=batch_size, replace=False)
        enc = tok([task.texts[i] for i in idx], padding=True, truncation=True, max_length=STUDY["max_length"],
                  return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([task.labels[i] for i in idx])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(dest)
    if kind != "lora":
        tok.save_pretrained(dest)
    return {"task": name, "kind": kind, "steps": steps, "lr": lr, "seconds": time.time() - t0,
            "final_loss": float(loss)}


def write_markdown(res: dict, study_dir: Path, meta: dict) -> str:
    """The study's tables, from its saved validation results."""
    from taskvec.report import summary_tables

    h = res["summary"]["heldout"]
    lines = [f"# External checkpoints study ({meta['device']})", "",
             f"Command: `{meta['command']}`; {meta['seconds']:.0f} s. Checkpoints: "
             + ", ".join(f"{t} ({k})" for t, k in TASKS.items()) + f"; study directory `{study_dir}`.", "",
             "| task | base % | fine-tuned % (θ0+τ, eval subset) | held-out base % | held-out fine-tuned % |",
             "|---|---|---|---|---|"]
    for t in res["tasks"]:
        lines.append(f"| {t} | {100 * res['base_accuracy'][t]:.1f} | {100 * res['finetuned_accuracy'][t]:.1f} | "
                     f"{100 * h['base_accuracy'][t]:.1f} | {100 * h['finetuned_accuracy'][t]:.1f} |")
    lines += [""]
    for header, rows in summary_tables(res):
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]
        lines.append("")
    lines += ["Held-out calibration (trusted = uncertainty ≤ threshold; error |Δp − Δh| on held-out examples):", "",
              "| uncertainty ≤ | n | held-out MAE (points) | within u + 2·se |", "|---|---|---|---|"]
    rows = [e for m in res["merges"] for e in m["per_task"].values()]
    for u in (0.5, 1.0, 2.0, 5.0, float("inf")):
        sel = [e for e in rows if e["uncertainty"] is not None and e["uncertainty"] <= u]
        if sel:
            lines.append(f"| {'∞' if u == float('inf') else u} | {len(sel)} | "
                         f"{np.mean([e['heldout']['error_points'] for e in sel]):.2f} | "
                         f"{100 * np.mean([e['heldout']['within_band'] for e in sel]):.0f}% |")
    I = np.asarray(res["interference"]["measured"]) * 100
    P = np.asarray(res["interference"]["predicted"]) * 100
    lines += ["", "Interference matrix (accuracy change of row task caused by column task's vector alone, points; "
              "measured / predicted):", "", "| | " + " | ".join(res["tasks"]) + " |",
              "|---|" + "---|" * len(res["tasks"])]
    for i, t in enumerate(res["tasks"]):
        lines.append(f"| {t} | " + " | ".join(f"{I[i, j]:+.1f} / {P[i, j]:+.1f}" for j in range(len(res["tasks"])))
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/external")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--n-eval", type=int, default=250)
    ap.add_argument("--n-holdout", type=int, default=250)
    ap.add_argument("--n-kernel", type=int, default=48)
    ap.add_argument("--rank", type=int, default=10)
    a = ap.parse_args(argv)
    import logging

    import taskvec
    from taskvec.report import write_report
    from taskvec.study import prepare_study

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.out)
    t0 = time.time()
    trained = {}
    for name, kind in TASKS.items():
        dest = out / "checkpoints" / name
        if not dest.exists():
            trained[name] = train_checkpoint(name, kind, dest, a.steps, a.lr if kind != "lora" else 5 * a.lr)
    study = {"base_model": "minilm", **STUDY,
             "tasks": [{"name": n, "model": str(out / "checkpoints" / n), "data": n} for n in TASKS]}
    (out / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    run = prepare_study(out / "study.yaml", out / "study", overwrite=True)
    res = taskvec.validate_run(run, n_eval=a.n_eval, n_kernel=a.n_kernel, rank=a.rank, n_holdout=a.n_holdout,
                               overwrite=True)
    write_report(run.root, overwrite=True)
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    meta = {"device": device, "seconds": time.time() - t0, "trained": trained,
            "command": "python analysis/external_checkpoints.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    md = write_markdown(res, run.root, meta)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": res["summary"]}, indent=2, default=str))
    dest = ROOT / "analysis" / "results" / "external_checkpoints_cpu.md"
    dest.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
