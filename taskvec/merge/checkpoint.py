"""Lazy, header-first reading of safetensors checkpoints (a model directory, its shards, or one file).

:class:`Checkpoint` reads only the headers when opened (names, shapes, dtypes, offsets, checked against
the file size) and maps one tensor's bytes at a time on :meth:`Checkpoint.get`, so the merge engine
holds only the tensors in use. Pickle checkpoints are refused with how to convert them.
"""

from __future__ import annotations

import json
import math
import mmap
import warnings
from pathlib import Path

import torch

from .methods import MergeError

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FLOATS = {"F64", "F32", "F16", "BF16"}
BUFFER_SUFFIXES = ("position_ids", "inv_freq", ".attn.masked_bias", ".attn.bias", "token_type_ids")


class Checkpoint:
    """Lazy safetensors tensors of a model directory (single file or sharded) or of one file.

    ``info`` maps tensor name → (shape, safetensors dtype string), read from the headers only. Tensors
    are read with plain ``readinto`` into fresh tensors (no memory map), so resident memory holds only
    the tensors in use, not the pages of every input file touched so far.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.where: dict[str, Path] = {}
        self.info: dict[str, tuple[tuple[int, ...], str]] = {}
        self.metadata: dict[str, str] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # pickle weights, read whole (only with --allow-pickle)
        index_path = self.path / "model.safetensors.index.json"
        weight_map = None
        if self.path.is_file():
            files = [self.path]
        elif index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MergeError(f"{index_path}: not a safetensors index ({e})") from None
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise MergeError(f"missing shard {f.name}: listed in {index_path} but not found in {self.path}")
        elif (self.path / "model.safetensors").is_file():
            files = [self.path / "model.safetensors"]
        elif self.path.is_dir() and any(self.path.glob("*.bin")):
            from ..modeling import PICKLE_HINT, load_pickle_state, pickle_is_allowed

            if not pickle_is_allowed():
                raise MergeError(f"{self.path}: only pickle weights (.bin); safetensors checkpoints are read. "
                                 f"{PICKLE_HINT}")
            self._loaded = load_pickle_state(self.path)  # --allow-pickle: torch.load(weights_only=True)
            for k, t in self._loaded.items():
                if t.dtype not in ST_NAMES:
                    raise MergeError(f"{self.path}: tensor {k!r} has dtype {t.dtype}, not one safetensors holds")
                self.where[k], self.info[k] = self.path, (tuple(t.shape), ST_NAMES[t.dtype])
            return
        else:
            raise MergeError(f"{self.path}: not found, or no model.safetensors / model.safetensors.index.json")
        for f in files:
            self._read_header(f)
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self.info:
                    raise MergeError(f"{index_path} lists tensor {k!r} in {f}, which does not contain it")

    def _read_header(self, f: Path) -> None:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
            start = 8 + n
            for k, v in header.items():
                if k == "__metadata__":
                    if not self.metadata:
                        self.metadata = dict(v or {})
                    continue
                a, b = v["data_offsets"]
                if not all(type(x) is int and x >= 0 for x in (*v["shape"], a, b)):
                    raise ValueError(f"tensor {k!r}: shape {v['shape']} and offsets {v['data_offsets']} must be "
                                     "non-negative integers")
                shape, dt = tuple(v["shape"]), v["dtype"]
                nbytes = math.prod(shape) * torch.empty((), dtype=ST_DTYPES[dt]).element_size()
                if not (0 <= a <= b and b - a == nbytes and start + b <= size):
                    raise ValueError(f"tensor {k!r}: offsets {a}..{b} do not fit dtype {dt} shape {list(shape)}")
                self.where[k], self.info[k], self._offsets[k] = f, (shape, dt), (start + a, start + b)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise MergeError(f"cannot read safetensors file {f} (corrupted header?): {e}") from None

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a CPU tensor over a private memory map of its bytes alone.

        Nothing is copied until it is used; the map (copy-on-write, so in-place operations never
        touch the file) is released with the tensor, so resident memory stays near the tensors in use.
        """
        if self._loaded:
            return self._loaded[name].clone()  # a copy: in-place operations never touch the loaded tensors
        shape, dt = self.info[name]
        a, b = self._offsets[name]
        dtype = ST_DTYPES[dt]
        if b == a:
            return torch.empty(shape, dtype=dtype)
        start = a - a % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.where[name], "rb") as fh:
                m = mmap.mmap(fh.fileno(), b - start, offset=start, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as e:
            raise MergeError(f"cannot read tensor {name!r} from {self.where[name]}: {e}") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(m, dtype=torch.uint8, offset=a - start, count=b - a)
        return flat.view(dtype).view(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name][0]


def check_finite(t: torch.Tensor, name: str, where) -> None:
    s = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(s) and not bool(torch.isfinite(t).all()):
        raise MergeError(f"tensor {name!r} in {where} contains NaN or Inf")


def is_buffer(name: str, dtype: str) -> bool:
    return dtype not in FLOATS or name.endswith(BUFFER_SUFFIXES)


__all__ = ["BUFFER_SUFFIXES", "Checkpoint", "FLOATS", "ST_DTYPES", "ST_NAMES", "check_finite", "is_buffer"]
