"""Plots of saved NTK spectra (matplotlib), drawn from the JSON written by :func:`taskvec.ntk.run_ntk`
(or any :meth:`taskvec.spectrum.SpectrumReport.to_json`). Nothing is computed here beyond reading.

* :func:`plot_spectrum` — log-log eigenvalues of ``K/n`` with the fitted power law over its window;
* :func:`plot_group_traces` — each layer's W_Q / W_K / W_V share of the kernel trace;
* :func:`plot_effective_ranks` — participation ratio, entropy rank, stable rank, k90, k99 per task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _save(fig, path) -> Path:
    """Lay out, write (PNG, 130 dpi) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path

def _load(report):
    if isinstance(report, (str, Path)):
        return json.loads(Path(report).read_text())
    return report.to_json() if hasattr(report, "to_json") else report


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectrum(reports: dict, path, centered: bool = False) -> Path:
    """Log-log spectrum per task with the power-law fit drawn over its window. ``reports``: task -> report
    (dict, path or SpectrumReport)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    key = "centered" if centered else "uncentered"
    for name, rep in reports.items():
        s = _load(rep)[key]
        lam = np.asarray(s["eigenvalues"])
        i = np.arange(1, lam.size + 1)
        pos = lam > 0
        d = s.get("decay")
        label = name + (f" (α={d['alpha']:.2f}, R²={d['r2']:.3f})" if d else "")
        line, = ax.loglog(i[pos], lam[pos], lw=1.2, label=label)
        if d:
            w = np.arange(d["start"], d["stop"] + 1)
            ax.loglog(w, np.exp(d["log_c"]) * w ** (-d["alpha"]), "--", color=line.get_color(), lw=1)
    ax.set_xlabel("index i")
    ax.set_ylabel("eigenvalue of K/n" + (" (centred)" if centered else ""))
    ax.set_title("eNTK spectrum")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_group_traces(reports: dict, path) -> Path:
    """Per-layer, per-matrix share of the trace, one panel column per task (bars for q/k/v by layer)."""
    plt = _plt()
    names = list(reports)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        g = _load(reports[name]).get("group_traces") or {}
        layers = sorted({k.split(".")[0] for k in g if "." in k}, key=lambda s: (len(s), s))
        roles = sorted({k.split(".")[1] for k in g if "." in k})
        x = np.arange(len(layers))
        wdt = 0.8 / max(1, len(roles))
        for j, r in enumerate(roles):
            ax.bar(x + j * wdt, [g.get(f"{layer}.{r}", 0.0) for layer in layers], wdt, label=f"W_{r.upper()}")
        ax.set_xticks(x + 0.4 - wdt / 2, layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of trace")
        ax.set_title(name)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_effective_ranks(reports: dict, path, centered: bool = False) -> Path:
    """Grouped bars of the effective ranks of each task's spectrum."""
    plt = _plt()
    keys = ["participation_ratio", "entropy_rank", "stable_rank", "k90", "k99"]
    names = list(reports)
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 4))
    x = np.arange(len(keys))
    wdt = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        r = _load(reports[name])["centered" if centered else "uncentered"]["ranks"]
        ax.bar(x + j * wdt, [r[k] for k in keys], wdt, label=name)
    ax.set_xticks(x + 0.4 - wdt / 2, [k.replace("_", " ") for k in keys])
    ax.set_yscale("log")
    ax.set_ylabel("effective rank")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_run(ntk_dir) -> list[Path]:
    """All three plots for ``RUN/ntk/`` (reads ``<task>.spectrum.json``); returns the written PNGs."""
    ntk_dir = Path(ntk_dir)
    reps = {p.name[: -len(".spectrum.json")]: p for p in sorted(ntk_dir.glob("*.spectrum.json"))}
    if not reps:
        return []
    return [plot_spectrum(reps, ntk_dir / "spectrum.png"), plot_group_traces(reps, ntk_dir / "group_traces.png"),
            plot_effective_ranks(reps, ntk_dir / "effective_ranks.png")]
