"""Peak bytes of the tensors a computation allocates, counted op by op (CPU and CUDA alike).

:class:`LiveTensorBytes` is a ``TorchDispatchMode``: every tensor an operator returns is counted once per
storage (views share theirs) until its last Python reference dies, so ``peak`` is the largest number of
bytes held at once by tensors created inside the block (tensors that existed before it, such as the
parameters, are not counted). It sits below ``torch.func`` transforms, so under ``jvp`` and ``vmap`` it
sees the physical primal and tangent tensors. Allocator overhead and kernels' internal workspaces are not
seen: callers that size work from it add a margin. Used by :func:`taskvec.linearize.jvp_plan` to measure
one small probe and scale it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as m: ...`` then ``m.peak`` (bytes) and ``m.current`` (bytes still held)."""

    def __init__(self):
        super().__init__()
        self._live: dict[tuple, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: tuple) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
            key, nbytes = (str(t.device), storage.data_ptr()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse)
            return
        if key in self._live:
            self._live[key][1] += 1
        else:
            self._live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
