"""Run the default pipeline (`taskvec run default`) end to end, timed, and publish its headline numbers.

Writes analysis/results/<config>_<device>.md (the report's summary plus wall time and hardware) and, with
--readme, replaces the README section between the `<!-- pipeline-results -->` markers with it. Every number
comes from the run's own RUN/results.json.

    .venv/bin/python analysis/default_pipeline.py --out runs/default --readme
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from taskvec.io import replace_marked_section
from taskvec.pipeline import load_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="default")
    p.add_argument("--out", default="runs/default")
    p.add_argument("--overwrite", action="store_true", help="recompute every stage (timing a fresh run)")
    p.add_argument("--readme", action="store_true", help="update the README section")
    p.add_argument("--section", default=None,
                   help="README marker name (default: pipeline-results for `default`, <config>-results otherwise)")
    a = p.parse_args(argv)
    t0 = time.time()
    run_pipeline(a.config, a.out, overwrite=a.overwrite)
    wall = time.time() - t0
    res = json.loads((Path(a.out) / "results.json").read_text())
    stages = json.loads((Path(a.out) / "pipeline.json").read_text()).get("wall_time_s", {})
    cuda = torch.cuda.is_available()
    hw = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    per_stage = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    cfg = load_config(a.config)
    fcfg = cfg.get("finetune", {})
    what = (f"{cfg.get('model', '?')}, scope {fcfg.get('scope', '?')}, {fcfg.get('optimizer', '?')} "
            f"lr {fcfg.get('lr', '?')}, tasks {', '.join(cfg.get('tasks', []))}")
    text = (f"Measured by `python analysis/default_pipeline.py --config {a.config}` (`taskvec run {a.config}`: "
            f"{what}) "
            f"on {hw}, torch {torch.__version__}: **{wall / 60:.1f} min** in total ({per_stage}). "
            f"Full report: `{a.out}/report/report.html`.\n\n{res['summary_markdown']}\n")
    print(text)
    dev = "cuda" if cuda else "cpu"
    (ROOT / "analysis" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "analysis" / "results" / f"{Path(a.config).stem}_{dev}.md").write_text(text)
    if a.readme:
        section = a.section or ("pipeline-results" if a.config == "default" else f"{Path(a.config).stem}-results")
        replace_marked_section(ROOT / "README.md", section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
