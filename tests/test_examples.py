"""The example notebook's code runs end to end against a tiny run (its cells, in order, in one namespace)."""

import json
from pathlib import Path

import matplotlib

ROOT = Path(__file__).resolve().parents[1]


def test_explain_and_validate_notebook_runs(tiny_run, monkeypatch):
    matplotlib.use("Agg")
    nb = json.loads((ROOT / "examples" / "explain_and_validate.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 5
    setup = code[0]
    assert 'RUN = Path("runs/example")' in setup and "N_EVAL, N_KERNEL, RANK = " in setup
    code[0] = (setup.replace('RUN = Path("runs/example")', f"RUN = Path({str(tiny_run)!r})")
               .replace("N_EVAL, N_KERNEL, RANK = 200, 32, 8", "N_EVAL, N_KERNEL, RANK = 24, 12, 3"))
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: None)
    ns: dict = {}
    for i, src in enumerate(code):
        exec(compile(src, f"<notebook cell {i}>", "exec"), ns)
    assert (tiny_run / "validation" / "notebook.json").exists()
    assert ns["val"]["summary"]["n_predictions"] == len(ns["val"]["merges"]) * len(ns["names"])
