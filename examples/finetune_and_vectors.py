"""Notebook-style walk-through: fine-tune MiniLM on two bundled tasks and play with task vectors.

Run: .venv/bin/python examples/finetune_and_vectors.py   (about 5 minutes on 2 CPU cores)
"""

import taskvec
from taskvec import FinetuneConfig

cfg = FinetuneConfig(scope="qkv", lr=2e-4, max_steps=100, eval_every=25, patience=2, max_train=500,
                     test_size=300, val_size=150)
results = taskvec.finetune("minilm", ["sms_spam", "trec"], "runs/example", cfg)
print(taskvec.results_table(results))

vecs = taskvec.extract_vectors("runs/example")
for name, tv in vecs.items():
    print(name, tv)
print("cosine(sms_spam, trec) =", vecs["sms_spam"].cosine(vecs["trec"]))

# Add both vectors to the base and evaluate each task with its own head.
import json
from pathlib import Path

from taskvec.finetune import evaluate
from taskvec.modeling import load_task_model, load_tokenizer
from taskvec.tasks import Batches, Splits, load_task

merged = sum(vecs.values())
tok = load_tokenizer("minilm")
for name in vecs:
    finetuned = load_task_model(f"runs/example/finetune/{name}")
    edited = merged.apply_to(load_task_model(f"runs/example/finetune/{name}", backbone="minilm"), coef=0.5)
    split = Splits.from_json(json.loads(Path(f"runs/example/finetune/{name}/split.json").read_text()))
    test = Batches(tok, load_task(name), split.test, 64)
    print(f"{name}: fine-tuned {evaluate(finetuned, test)['accuracy']:.3f}, "
          f"base + 0.5·(τ_sms + τ_trec) {evaluate(edited, test)['accuracy']:.3f}")
