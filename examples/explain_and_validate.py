"""Notebook-style walk-through: explain and predict merges of a fine-tuning run, then check them.

Needs a run with task vectors, e.g. from examples/finetune_and_vectors.py (runs/example) or `make run`
(runs/default). Run: .venv/bin/python examples/explain_and_validate.py runs/example
"""

import sys

import numpy as np

import taskvec
from taskvec.merge import MergeSpec
from taskvec.report import summary_markdown

run = sys.argv[1] if len(sys.argv) > 1 else "runs/example"

# Predict (linearised model, first and second order), build and measure, explain through the eNTK.
res = taskvec.validate_run(run, merges=[MergeSpec("TA λ=0.5", "task_arithmetic", {"lambda": 0.5}),
                                        MergeSpec("TIES", "ties", {"density": 0.2})],
                           n_eval=200, n_kernel=32, rank=8, lambdas=[0.25, 0.5, 0.75, 1.0],
                           out=f"{run}/validation/example.json")  # keeps the run's own results.json
print(summary_markdown({"validation": res}))

names = res["tasks"]
print(f"\neigenspace overlap (random baseline {res['eigen']['random_baseline']:.1e}):")
print(np.array(res["eigen"]["overlap"]).round(3))
print("\npredicted interference (accuracy change of row task from column vector, points):")
print((100 * np.array(res["interference"]["predicted"])).round(1), names)

# `taskvec report RUN` (taskvec.write_report(run)) draws the page from RUN/validation/results.json.
