"""The outcome of one task's fine-tuning (:class:`TaskResult`, saved in ``log.json``) and its tables."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TaskResult:
    """Outcome of one task's fine-tuning (also in ``log.json``)."""

    task: str
    path: str
    stop_reason: str
    best_step: int
    steps: int
    probe_test_accuracy: float
    test_accuracy: float
    test_loss: float
    majority_accuracy: float
    wall_time_s: float
    curve: list[dict] = field(default_factory=list)
    rules: list[dict] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"TaskResult({self.task!r}: test accuracy {100 * self.probe_test_accuracy:.1f}% probe -> "
                f"{100 * self.test_accuracy:.1f}% fine-tuned "
                f"({100 * (self.test_accuracy - self.probe_test_accuracy):+.1f} points), best step "
                f"{self.best_step}/{self.steps}, stop: {self.stop_reason})")

    def table_row(self) -> list[str]:
        """The cells under :data:`RESULT_COLUMNS` (percentages, whole stop reason), as strings."""
        return [self.task, f"{100 * self.majority_accuracy:.1f}", f"{100 * self.probe_test_accuracy:.1f}",
                f"{100 * self.test_accuracy:.1f}", f"{100 * (self.test_accuracy - self.probe_test_accuracy):+.1f}",
                str(self.best_step), str(self.steps), self.stop_reason, f"{self.wall_time_s:.0f}"]

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in RESULT_COLUMNS)
        row = "".join(f"<td>{html.escape(x)}</td>" for x in self.table_row())
        return f"<table><thead><tr>{head}</tr></thead><tbody><tr>{row}</tr></tbody></table>"


# the columns of TaskResult.table_row (results_table, TaskResult._repr_html_, the report's fine-tuning table)
RESULT_COLUMNS = ["task", "majority %", "probe %", "fine-tuned %", "Δ points", "best step", "steps", "stop",
                  "wall s"]


def results_table(results: list[TaskResult]) -> str:
    """Markdown table: probe vs fine-tuned test accuracy, stop step and (whole) stop reason, wall time."""
    rows = ["| task | majority | probe acc | fine-tuned acc | Δ (points) | best step | steps run | stop | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append("| " + " | ".join(x.replace("|", "\\|") for x in r.table_row()) + " |")
    if results:
        m = sum(r.test_accuracy - r.probe_test_accuracy for r in results) / len(results)
        rows.append(f"| **mean** | | {100 * np.mean([r.probe_test_accuracy for r in results]):.1f} | "
                    f"{100 * np.mean([r.test_accuracy for r in results]):.1f} | {100 * m:+.1f} | | | | "
                    f"{sum(r.wall_time_s for r in results):.0f} |")
    return "\n".join(rows)


__all__ = ["RESULT_COLUMNS", "TaskResult", "results_table"]
