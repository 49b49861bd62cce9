"""What each validation phase costs, in forward-pass equivalents (FPE) and seconds.

One **FPE** is one float32 forward pass of one model over every task's evaluation examples — exactly what
measuring one merge costs (:meth:`Context.measure`). Each phase counts what it does in that unit:

* ``forward`` — float32 forward passes (a measurement is 1; a forward over one task's examples is that
  task's share of all evaluation examples; held-out and kernel examples count by their number);
* ``forward64`` — float64 forward passes (the finite differences of the second-order terms);
* ``jvp_tangents`` — tangents of batched forward-mode JVPs (one primal pass is counted under ``forward``);
* ``reverse`` — reverse passes (the eNTK's per-example gradients, the eigenbases' VJPs), counted per output
  row over the examples they cover.

The counts say what was done; they do not say what it cost, since a float64 forward or a JVP tangent is
dearer than a float32 forward. So every phase also reports its wall time and ``fpe_by_time`` = its seconds
divided by the seconds of one measurement in the same run (the median over the run's measurements): the
comparable number, and the one the compute comparison (``analysis/search_vs_prediction.py``) uses.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

OPS = ("forward", "forward64", "jvp_tangents", "reverse")


@dataclass
class Ledger:
    """Counts of operations (in FPE) and seconds per phase, and the timed measurements that set the unit.

    ``unit_examples``: the number of examples one FPE covers (Σ over tasks of their evaluation examples).
    """

    unit_examples: int
    counts: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    measure_seconds: list = field(default_factory=list)  # wall time of each full measurement (eval subset)
    _phase: list = field(default_factory=list)

    @property
    def current(self) -> str:
        return self._phase[-1] if self._phase else "other"

    def add(self, op: str, examples: int, count: float = 1.0, phase: str | None = None) -> None:
        """Count ``count`` operations ``op`` over ``examples`` examples in ``phase`` (default: the open one)."""
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
        self.counts[phase or self.current][op] += count * examples / self.unit_examples

    @contextmanager
    def phase(self, name: str):
        """Time the block as phase ``name`` (nested phases count their seconds in the innermost only)."""
        self._phase.append(name)
        t0 = time.perf_counter()
        outer = None
        try:
            yield self
        finally:
            dt = time.perf_counter() - t0
            self._phase.pop()
            self.seconds[name] += dt
            outer = self.current if self._phase else None
            if outer is not None:
                self.seconds[outer] -= dt

    def fpe_seconds(self) -> float | None:
        """Seconds of one FPE: the median wall time of this run's full measurements (None before any)."""
        return statistics.median(self.measure_seconds) if self.measure_seconds else None

    def to_json(self) -> dict:
        """``{"unit", "unit_examples", "seconds_per_fpe", "phases": {phase: {"seconds", "fpe_by_time",
        "ops": {op: FPE}}}, "total": {...}}`` (plain JSON)."""
        unit = self.fpe_seconds()
        phases = {}
        for name in list(self.seconds) + [p for p in self.counts if p not in self.seconds]:
            s = self.seconds.get(name, 0.0)
            phases[name] = {"seconds": s, "fpe_by_time": s / unit if unit else None,
                            "ops": {op: v for op, v in self.counts.get(name, {}).items() if v}}
        total_s = sum(self.seconds.values())
        return {"unit": "one float32 forward pass over every task's evaluation examples (= one measurement)",
                "unit_examples": self.unit_examples, "seconds_per_fpe": unit, "phases": phases,
                "total": {"seconds": total_s, "fpe_by_time": total_s / unit if unit else None}}


def prediction_cost(compute: dict, phases=("eigenspaces", "predictions")) -> float | None:
    """FPE (by time) that a prediction of merges costs: the phases it needs before any measurement."""
    ps = compute.get("phases", {})
    vals = [ps[p]["fpe_by_time"] for p in phases if p in ps]
    return float(sum(vals)) if vals and all(v is not None for v in vals) else None


__all__ = ["OPS", "Ledger", "prediction_cost"]
