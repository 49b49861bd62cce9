"""The result of :func:`taskvec.ntk.empirical_ntk` and the kernel layouts (full, trace, diagonal)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import torch

from ..modelfn import NTKError

KERNELS = ("full", "trace", "diagonal")


@dataclass(repr=False)
class NTKResult:
    """An empirical NTK and how it was computed.

    Attributes:
        kernel: float64 CPU tensor, ``(n1, n2, o1, o2)`` (full), ``(n1, n2)`` (trace: the *average* over
            outputs) or ``(n1, n2, o)`` (diagonal).
        groups: group label (``"3.q"``) -> that group's kernel, same shape; they sum to ``kernel``
            exactly for exact/reference. For sketch each is an unbiased sketch of its group's kernel and
            their sum is unbiased for K, but it is not the sketched ``kernel`` (which also holds the
            cross-group terms ``<φ_g, φ_h>``, zero in expectation). Empty if not requested.
        kind, output, mode: the options used. params: the parameter spec (scope string or "custom").
        n1, n2, o1, o2: examples and outputs per side; p: selected parameter entries; group_sizes: p per group.
        sketch_dim, seed, projection: sketch settings (mode="sketch"). symmetric: inputs2 was None.
        seconds: wall time; info: extra counters (gradient passes, memory budget, ...).
    """

    kernel: torch.Tensor
    groups: dict
    kind: str
    output: str
    mode: str
    params: str
    n1: int
    n2: int
    o1: int
    o2: int
    p: int
    group_sizes: dict
    symmetric: bool
    sketch_dim: int | None = None
    seed: int | None = None
    projection: str | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def matrix(self) -> torch.Tensor:
        """The kernel as a 2-D float64 matrix: ``(n1·o1, n2·o2)`` (example-major) for full, ``(n1, n2)`` for
        trace; diagonal kernels are averaged over outputs first."""
        return kernel_matrix(self.kernel, self.kind)

    def meta(self) -> dict:
        """JSON-serialisable description (everything except tensors)."""
        return {k: getattr(self, k) for k in ("kind", "output", "mode", "params", "n1", "n2", "o1", "o2", "p",
                                              "group_sizes", "symmetric", "sketch_dim", "seed", "projection",
                                              "seconds", "info")} | {"groups_present": list(self.groups)}

    def _summary(self) -> dict[str, str]:
        """Short ``name -> value`` strings describing the result (no tensor values)."""
        how = f"{self.mode}"
        if self.mode == "sketch":
            how += f" (k={self.sketch_dim}, {self.projection}, seed {self.seed})"
        out = {"kernel": f"{self.kind} {tuple(self.kernel.shape)} {str(self.kernel.dtype).replace('torch.', '')}",
               "mode": how, "output": self.output, "params": f"{self.params} (p={self.p:,})",
               "examples": f"{self.n1}" if self.symmetric else f"{self.n1} x {self.n2}",
               "outputs": f"{self.o1}" if self.o1 == self.o2 else f"{self.o1} x {self.o2}",
               "groups": f"{len(self.groups)} of {len(self.group_sizes)}"}
        for k in ("engine", "schedule", "world_size"):
            if self.info.get(k) is not None:
                out[k] = str(self.info[k])
        out["seconds"] = f"{self.seconds:.3g}"
        return out

    def __repr__(self) -> str:
        return "NTKResult(" + ", ".join(f"{k}={v}" for k, v in self._summary().items()) + ")"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(v)}</td></tr>" for k, v in self._summary().items())
        return f"<table><caption style='text-align:left'><b>NTKResult</b></caption>{rows}</table>"

    def save(self, path) -> None:
        """Write ``path`` (safetensors: ``kernel`` and ``group/<label>``) and ``path`` + ``.json`` (meta)."""
        from safetensors.torch import save_file

        from ..io import atomic_file, write_json

        tensors = {"kernel": self.kernel.contiguous()}
        tensors.update({f"group/{g}": k.contiguous() for g, k in self.groups.items()})
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp))
        write_json(str(path) + ".json", self.meta())

    @classmethod
    def load(cls, path) -> NTKResult:
        import json

        from safetensors.torch import load_file

        t = load_file(str(path))
        with open(str(path) + ".json") as f:
            meta = json.load(f)
        meta.pop("groups_present", None)
        groups = {k[len("group/"):]: v for k, v in t.items() if k.startswith("group/")}
        return cls(kernel=t["kernel"], groups=groups, **meta)


def kernel_matrix(kernel: torch.Tensor, kind: str) -> torch.Tensor:
    """2-D view of a kernel: full ``(n1, n2, o1, o2)`` -> ``(n1·o1, n2·o2)``; trace as is; diagonal -> mean."""
    if kind == "full":
        n1, n2, o1, o2 = kernel.shape
        return kernel.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)
    if kind == "trace":
        return kernel
    if kind == "diagonal":
        return kernel.mean(-1)
    raise NTKError(f"unknown kernel kind {kind!r}; valid: {', '.join(KERNELS)}")


def convert_kernel(full: torch.Tensor, kind: str) -> torch.Tensor:
    """Full ``(n1, n2, o, o)`` kernel to ``kind`` (trace = average of the diagonal outputs)."""
    if kind == "full":
        return full
    d = torch.diagonal(full, dim1=2, dim2=3)  # (n1, n2, o)
    return d if kind == "diagonal" else d.mean(-1)
