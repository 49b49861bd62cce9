"""Fine-tuning benchmark: `taskvec finetune` with MiniLM, scope qkv, on the 4 default bundled tasks.

Prints and writes a markdown table (probe vs fine-tuned test accuracy, stop step, wall time) to
benchmarks/results/finetune_<device>.md, and updates the README section between the
`<!-- finetune-table -->` markers. Usage:

    .venv/bin/python benchmarks/finetune.py [--out runs/bench-finetune] [--device cpu] [extra finetune flags]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from taskvec.cli import _add_finetune_args, _finetune_config
from taskvec.finetune import finetune, results_table
from taskvec.io import replace_marked_section
from taskvec.tasks import DEFAULT_TASKS

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS)
    p.add_argument("--out", default="runs/bench-finetune")
    p.add_argument("--no-readme", action="store_true")
    _add_finetune_args(p)
    a = p.parse_args(argv)
    cfg = _finetune_config(a)
    t0 = time.time()
    res = finetune(a.model, a.tasks, a.out, cfg, overwrite=True, progress=False)
    wall = time.time() - t0
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hw = (torch.cuda.get_device_name() if dev.startswith("cuda") else
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    table = results_table(res)
    worst = min(r.test_accuracy - r.probe_test_accuracy for r in res)
    text = (f"Measured by `python benchmarks/finetune.py` ({a.model}, scope `{cfg.scope}`, {cfg.optimizer} "
            f"lr {cfg.lr:g}, batch {cfg.batch_size}, eval every {cfg.eval_every} steps, early stopping "
            f"{'+'.join(cfg.early_stopping) or 'none'} (patience {cfg.patience}), ≤ {cfg.max_train} training "
            f"examples per task; {dev}: {hw}; torch {torch.__version__}). Total wall time "
            f"**{wall / 60:.1f} min**; worst task Δ {100 * worst:+.1f} points.\n\n{table}\n")
    print(text)
    out = ROOT / "benchmarks" / "results" / f"finetune_{dev.split(':')[0]}.md"
    out.write_text(text)
    if not a.no_readme and dev == "cpu":
        replace_marked_section(ROOT / "README.md", "finetune-table", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
