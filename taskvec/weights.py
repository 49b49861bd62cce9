"""Loading checkpoint weights safely: the pickle policy and the checks of safetensors files.

taskvec reads safetensors. A model directory with only pickle weights (``pytorch_model.bin``) is refused
with a message that says how to convert it, unless the user opts in (``--allow-pickle``, ``allow_pickle=True``
or :func:`pickle_allowed`); then it is read with ``torch.load(weights_only=True)`` (no code runs). Re-exported
by :mod:`taskvec.modeling`.
"""

from __future__ import annotations

import contextvars
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import TaskvecError


class ModelError(TaskvecError, ValueError):
    """A model name or directory that cannot be loaded."""


_ALLOW_PICKLE = contextvars.ContextVar("taskvec_allow_pickle", default=False)


@contextmanager
def pickle_allowed(allow: bool = True):
    """Within the block, model directories holding only pickle weights (``pytorch_model.bin``) are loaded,
    with ``torch.load(weights_only=True)``, by every loader that is not told otherwise: the base model of
    fine-tuning and of a run's stages, task vectors' base weights, merge inputs, studies' checkpoints. The
    CLI's ``--allow-pickle`` runs its command inside this block; in Python, ``allow_pickle=True`` of
    :func:`load_backbone` / :func:`check_model` opts in for one call."""
    token = _ALLOW_PICKLE.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


def pickle_is_allowed(allow_pickle: bool | None = None) -> bool:
    """``allow_pickle``, or (``None``) whether the caller is inside :func:`pickle_allowed`."""
    return _ALLOW_PICKLE.get() if allow_pickle is None else bool(allow_pickle)


#: how to convert pickle weights once, named by every refusal
PICKLE_HINT = ("Convert once: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True); or pass "
               "--allow-pickle (Python: allow_pickle=True / taskvec.modeling.pickle_allowed()) to load them with "
               "torch.load(weights_only=True)")


def check_weights(path: Path, allow_pickle: bool | None = None) -> bool:
    """Whether the model directory ``path`` holds safetensors weights; with only pickle weights
    (``pytorch_model.bin``, ``*.pt``) a :class:`ModelError` that says how to convert them, unless pickle is
    allowed (``allow_pickle``, or inside :func:`pickle_allowed`; then ``False`` is returned and they are
    loaded with ``weights_only=True``)."""
    path = Path(path)
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return True
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not pickles:
        raise ModelError(f"{path}: no weights (expected model.safetensors or model.safetensors.index.json)")
    if not pickle_is_allowed(allow_pickle):
        raise ModelError(f"{path}: only pickle weights ({', '.join(pickles)}); taskvec reads safetensors. "
                         f"{PICKLE_HINT}")
    return False


def load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model directory's pickle weights (``pytorch_model.bin``, or the shards its
    ``pytorch_model.bin.index.json`` lists), read with ``torch.load(weights_only=True)`` (no code runs)
    and memory-mapped. Only for a directory :func:`check_weights` allowed; a shard that is not a state
    dict is a :class:`ModelError` naming it."""
    path = Path(path)
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: not a weights index (expected a JSON object with a 'weight_map'): {e}") from None
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors have many types; name the file
            raise ModelError(f"{f}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ModelError(f"{f}: not a state dict (a mapping of tensor names to tensors)")
        state.update(part)
    return state


def check_safetensors(path: Path) -> None:
    """Read the header of every safetensors file of the model directory ``path`` (no tensor data): a
    truncated file or a corrupted header is a :class:`ModelError` naming the file, and so is a shard listed
    in ``model.safetensors.index.json`` that is missing."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: not a safetensors index (expected a JSON object with a "
                             f"'weight_map'): {e}") from None
        missing = [f for f in listed if not (path / str(f)).is_file()]
        if missing:
            raise ModelError(f"{index} lists shard {missing[0]}, which is not in {path}")
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{f}: not a readable safetensors file ({e}); truncated or corrupted? "
                             "Save the model again (save_pretrained)") from None
