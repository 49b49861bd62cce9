"""Planned, streaming safetensors shard writer: headers first, then each tensor's bytes as it arrives."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .checkpoint import ST_NAMES
from .methods import MergeError


class ShardWriter:
    """Writes tensors, in a fixed planned order, straight into safetensors shard files.

    Shard headers are written first (names, dtypes, shapes are known from the plan), then each tensor's
    bytes as it arrives, so no shard is held in memory.
    """

    def __init__(self, out_dir: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], shard_size: int):
        self.out_dir = out_dir
        shards, cur, size = [], [], 0
        for name, shape, dt in specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            if cur and size + nbytes > shard_size:
                shards.append(cur)
                cur, size = [], 0
            cur.append((name, shape, dt, nbytes))
            size += nbytes
        if cur or not shards:
            shards.append(cur)
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [(name, shape, dt, i) for i, s in enumerate(shards) for name, shape, dt, _ in s]
        self.shards = shards
        self.pos = 0
        self.fh = None
        self._pool = ThreadPoolExecutor(max_workers=1)  # writes overlap the next tensor's merge
        self._pending = None
        self.cur_shard = -1
        self.total = sum(nb for s in shards for *_, nb in s)

    def _start(self, i: int) -> None:
        if self.fh is not None:
            self.fh.close()
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dt, nb in self.shards[i]:
            header[name] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self.fh = open(self.out_dir / self.files[i], "wb")
        self.fh.write(len(hb).to_bytes(8, "little") + hb)
        self.cur_shard = i

    def write(self, name: str, t: torch.Tensor) -> None:
        exp_name, shape, dt, shard = self.order[self.pos]
        if name != exp_name or tuple(t.shape) != tuple(shape) or t.dtype != dt:
            raise MergeError(f"internal: expected {exp_name} {shape} {dt}, got {name} {tuple(t.shape)} {t.dtype}")
        self._wait()
        if shard != self.cur_shard:
            self._start(shard)
        if t.numel():
            data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
            self._pending = self._pool.submit(self.fh.write, data)  # at most one tensor in flight
        self.pos += 1

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def abort(self) -> None:
        """Stop after a failure: let the write in flight finish, close the file."""
        try:
            self._wait()
        except Exception:
            pass
        self._pool.shutdown()
        if self.fh is not None:
            self.fh.close()

    def close(self) -> None:
        self._wait()
        self._pool.shutdown()
        while self.cur_shard < len(self.shards) - 1:  # empty trailing shards (only if nothing was planned)
            self._start(self.cur_shard + 1)
        if self.fh is not None:
            self.fh.close()
        if self.pos != len(self.order):
            raise MergeError(f"internal: wrote {self.pos} of {len(self.order)} tensors")
        weight_map = {name: self.files[i] for name, _, _, i in self.order}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["ShardWriter"]
