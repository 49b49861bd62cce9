"""Merging fine-tuned checkpoints of one base model: methods, streaming engine, configs, LoRA.

Python API::

    from taskvec.merge import merge
    merge("merge.yaml", "out/", overwrite=False, device="cpu", dtype=None, show_progress=True)

    from taskvec.merge import merge_vectors   # the same methods on task vectors in memory
    delta = merge_vectors([tv_a, tv_b], "ties", base_state, density=0.2)

See ``docs/merge.md`` for the methods, their parameters and the YAML format.
"""

import sys as _sys
import types as _types

from .config import MergeConfig, ModelSpec, load_config, to_mergekit
from .engine import Checkpoint, MergeResult, merge, plan
from .lora import LoraAdapter, factorize, lora_delta, lora_scaling
from .memory import MergeSpec, merge_vectors
from .methods import METHODS, Method, MergeError, Param, get_method, register

__all__ = [
    "merge", "MergeResult", "MergeConfig", "ModelSpec", "load_config", "to_mergekit", "plan", "Checkpoint",
    "METHODS", "Method", "Param", "MergeError", "get_method", "register",
    "LoraAdapter", "lora_delta", "lora_scaling", "factorize", "MergeSpec", "merge_vectors",
]


class _CallableModule(_types.ModuleType):
    """Lets ``taskvec.merge(config, out, ...)`` call :func:`merge` while ``taskvec.merge`` stays a package."""

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
