"""Task vectors: τ = θ_fine-tuned − θ_base, restricted to a scope, with arithmetic and safetensors I/O.

Tensors are keyed by **backbone-relative parameter names** (``encoder.layer.0.attention.self.query.weight``),
so a vector extracted from a ``TaskModel``, a bare ``AutoModel``, a ``*ForSequenceClassification`` model
or a checkpoint directory applies to any of them. Each tensor is full-shaped; a sliced (fused-QKV) scope
stores zeros outside its slices. Task heads are never part of τ: they are kept in :attr:`TaskVector.heads`.

File format (``tv.save(path)``): one safetensors file with the deltas, and safetensors metadata
``format="taskvec.task_vector"``, ``version="1"``, ``base_fingerprint``, ``base_model``, ``scope``, ``task``,
``dtype``. Heads, when present, go to ``<path without .safetensors>.head.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import BaseMismatchError, ShapeMismatchError, TaskvecError
from .io import atomic_file, sort_safetensors_metadata
from .modeling import fingerprint
from .scopes import resolve_scope

FORMAT = "taskvec.task_vector"


# --- reading models as backbone-relative state dicts ----------------------------------------------


def _backbone_of(model: nn.Module) -> nn.Module:
    """The transformers backbone inside a TaskModel, head model, peft model or bare backbone."""
    if hasattr(model, "backbone") and isinstance(model.backbone, nn.Module):
        return model.backbone
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model and hasattr(model, "base_model_prefix"):
        return base
    return model


class _StateView(nn.Module):
    """Wraps a state dict so that :func:`resolve_scope` can run on it without building the model."""

    def __init__(self, state: dict[str, torch.Tensor], config=None):
        super().__init__()
        self._state, self.config = state, config

    def named_parameters(self, *a, **k):  # type: ignore[override]
        return iter(self._state.items())


def _read_dir_state(path: Path) -> tuple[dict[str, torch.Tensor], object]:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .modeling import resolve_model

    path = resolve_model(path)
    index = path / "model.safetensors.index.json"
    state: dict[str, torch.Tensor] = {}
    if index.exists():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (path / shard).exists():
                raise TaskvecError(f"{path}: shard {shard} named in model.safetensors.index.json is missing")
            state.update(load_file(str(path / shard)))
    elif (path / "model.safetensors").exists():
        state = load_file(str(path / "model.safetensors"))
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
        from .modeling import check_weights, load_pickle_state

        check_weights(path)  # refused with how to convert, unless pickle is allowed (--allow-pickle)
        state = load_pickle_state(path)
    else:
        raise TaskvecError(f"{path} has no model.safetensors")
    return state, AutoConfig.from_pretrained(path)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    if prefix and any(k.startswith(prefix + ".") for k in state):
        return {k[len(prefix) + 1:] if k.startswith(prefix + ".") else k: v for k, v in state.items()}
    return state


def _as_state(model) -> tuple[dict[str, torch.Tensor], object]:
    """(backbone-relative float tensors, config) of a module or a checkpoint directory."""
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if (p / "head.json").exists():  # a taskvec task-model directory
            p = p / "model"
        state, config = _read_dir_state(p)
        from transformers import AutoModel

        prefix = getattr(AutoModel._model_mapping.get(type(config), None), "base_model_prefix", None) \
            if hasattr(AutoModel, "_model_mapping") else None
        state = _strip_prefix(state, prefix)
        return {k: v for k, v in state.items() if v.is_floating_point()}, config
    bb = _backbone_of(model)
    return {k: v.detach() for k, v in bb.state_dict().items() if v.is_floating_point()}, getattr(bb, "config", None)


def state_fingerprint(state: dict[str, torch.Tensor], config=None) -> str:
    """Fingerprint of a backbone state dict over its attention matrices (W_Q, W_K, W_V, W_O).

    Attention matrices are in every checkpoint of every supported architecture, whereas optional
    tensors (an unused BERT pooler, buffers) may be missing from a file and randomly initialised on
    load; hashing only the attention matrices makes the fingerprint of a directory equal that of the
    module loaded from it. Falls back to every floating tensor for architectures without them.
    """
    from .scopes import ScopeError

    try:
        names = [s.name for s in resolve_scope(_StateView(state, config), "attention")]
    except ScopeError:
        names = list(state)
    return fingerprint(state, sorted(set(names)))


def base_fingerprint(model) -> str:
    """Fingerprint of a base model's backbone (module or directory); see :func:`state_fingerprint`."""
    state, config = _as_state(model)
    return state_fingerprint(state, config)


# --- the TaskVector ---------------------------------------------------------------------------------


class TaskVector:
    """A task vector: a dict of backbone-relative parameter deltas plus provenance.

    Arithmetic: ``tv1 + tv2``, ``-tv``, ``tv1 - tv2``, ``c * tv``, ``tv / c``, ``sum([...])``; vectors must share a
    base fingerprint. Tensors missing on one side count as zero.
    """

    def __init__(self, deltas: dict[str, torch.Tensor], *, base_fingerprint: str | None = None, scope: str = "",
                 task: str = "", base_model: str = "", heads: dict[str, torch.Tensor] | None = None):
        self.deltas = dict(deltas)
        self.base_fingerprint = base_fingerprint
        self.scope, self.task, self.base_model = scope, task, base_model
        self.heads = heads or {}

    # -- construction
    @classmethod
    def from_models(cls, base, finetuned, scope: str | None = None, task: str = "") -> TaskVector:
        """τ = finetuned − base over ``scope`` (default: every backbone tensor that differs in shape-agreeing
        keys, i.e. ``full``). ``base``/``finetuned``: modules or directories (HF or taskvec task-model dirs).

        Raises :class:`ShapeMismatchError` naming the tensor and both shapes, and
        :class:`TaskvecError` when a tensor of the base is missing from the fine-tuned model.
        """
        b_state, config = _as_state(base)
        f_state, _ = _as_state(finetuned)
        heads = {}
        if not isinstance(finetuned, (str, os.PathLike)) and hasattr(finetuned, "head"):
            heads = {k: v.detach().clone() for k, v in finetuned.head.state_dict().items()}
        sels = resolve_scope(_StateView(b_state, config), scope or "full")
        deltas = {}
        for name in dict.fromkeys(s.name for s in sels):
            if name not in f_state:
                raise TaskvecError(f"tensor {name!r} of the base is missing from the fine-tuned model")
            a, b = b_state[name], f_state[name]
            if tuple(a.shape) != tuple(b.shape):
                raise ShapeMismatchError(f"tensor {name!r}: base shape {tuple(a.shape)} vs fine-tuned "
                                         f"shape {tuple(b.shape)}")
            d = b.to(torch.float32) - a.to(torch.float32)
            parts = [s for s in sels if s.name == name]
            if not any(s.is_whole for s in parts):  # fused QKV slices: zero outside them
                mask = torch.zeros(d.shape, dtype=torch.bool)
                for s in parts:
                    mask |= s.mask()
                d = d * mask
            deltas[name] = d
        base_name = str(base) if isinstance(base, (str, os.PathLike)) else \
            str(getattr(getattr(_backbone_of(base), "config", None), "_name_or_path", ""))
        return cls(deltas, base_fingerprint=state_fingerprint(b_state, config), scope=scope or "full", task=task,
                   base_model=base_name, heads=heads)

    @classmethod
    def from_peft(cls, peft_model, base=None, task: str = "", adapter_name: str = "default") -> TaskVector:
        """Exact LoRA task vector ΔW = scaling·B·A (transposed for ``fan_in_fan_out``), from a peft model or
        an adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

        ``scaling`` is lora_alpha/r, or lora_alpha/√r with rsLoRA. ``base`` (module or directory) supplies
        the base fingerprint; a peft model supplies its own. DoRA adapters are refused (not a plain ΔW).
        """
        if isinstance(peft_model, (str, os.PathLike)):
            return cls._from_adapter_dir(Path(peft_model), base, task)
        deltas: dict[str, torch.Tensor] = {}
        heads: dict[str, torch.Tensor] = {}
        for name, mod in peft_model.named_modules():
            if hasattr(mod, "lora_A") and adapter_name in getattr(mod, "lora_A", {}):
                if getattr(mod, "use_dora", {}).get(adapter_name, False):
                    raise TaskvecError(f"{name}: DoRA adapters are not a plain ΔW = B·A; merge them with peft")
                A = mod.lora_A[adapter_name].weight.detach().float()
                B = mod.lora_B[adapter_name].weight.detach().float()
                dw = (B @ A) * float(mod.scaling[adapter_name])
                if getattr(mod, "fan_in_fan_out", False):
                    dw = dw.T
                deltas[_peft_to_backbone_name(name, peft_model) + ".weight"] = dw.contiguous()
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name and adapter_name in name:
                heads[name.split("modules_to_save." + adapter_name + ".")[-1]] = p.detach().clone()
        if not deltas:
            raise TaskvecError(f"{type(peft_model).__name__} has no LoRA layers for adapter {adapter_name!r}")
        base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        fp = base_fingerprint(base) if base is not None else _unmerged_fingerprint(peft_model)
        del base_model
        return cls(deltas, base_fingerprint=fp, scope="lora", task=task, heads=heads)

    @classmethod
    def _from_adapter_dir(cls, path: Path, base, task: str) -> TaskVector:
        from safetensors.torch import load_file

        from .modeling import load_pickle_state, pickle_is_allowed

        cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
        pickled = not w_path.exists() and (path / "adapter_model.bin").exists()
        if pickled and not pickle_is_allowed():
            raise TaskvecError(f"{path}: only pickle adapter weights (adapter_model.bin); safetensors are read. "
                               "Convert once: PeftModel.from_pretrained(base, dir).save_pretrained(dir, "
                               "safe_serialization=True); or pass --allow-pickle (torch.load(weights_only=True))")
        if not cfg_path.exists() or not (w_path.exists() or pickled):
            raise TaskvecError(f"{path} is not a peft adapter directory (needs adapter_config.json and "
                               "adapter_model.safetensors)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("use_dora"):
            raise TaskvecError(f"{path}: DoRA adapters are not a plain ΔW = B·A")
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
        state = load_pickle_state(path) if pickled else load_file(str(w_path))
        deltas = {}
        for k, A in state.items():
            if ".lora_A." not in k:
                continue
            mod = k.split(".lora_A.")[0]
            rank = int(cfg.get("rank_pattern", {}).get(mod.split(".")[-1], r))
            a = float(cfg.get("alpha_pattern", {}).get(mod.split(".")[-1], alpha))
            scaling = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
            B = state[k.replace(".lora_A.", ".lora_B.")]
            dw = (B.float() @ A.float()) * scaling
            if cfg.get("fan_in_fan_out"):
                dw = dw.T
            deltas[_peft_key_to_backbone(mod) + ".weight"] = dw.contiguous()
        fp = base_fingerprint(base) if base is not None else None
        return cls(deltas, base_fingerprint=fp, scope="lora", task=task,
                   base_model=str(cfg.get("base_model_name_or_path") or ""))

    # -- I/O
    def save(self, path, overwrite: bool = True) -> Path:
        """Write the vector (and heads, if any) as safetensors, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        dtypes = {str(t.dtype).replace("torch.", "") for t in self.deltas.values()}
        meta = {"format": FORMAT, "version": "1", "base_fingerprint": self.base_fingerprint or "",
                "base_model": self.base_model, "scope": self.scope, "task": self.task,
                "dtype": ",".join(sorted(dtypes))}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.deltas.items()}
        with atomic_file(path, overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
            sort_safetensors_metadata(tmp)  # the same vector is the same bytes
        if self.heads:
            hp = path.with_name(path.name.removesuffix(".safetensors") + ".head.safetensors")
            with atomic_file(hp, overwrite) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.items()}, str(tmp))
        return path

    @classmethod
    def load(cls, path, device=None) -> TaskVector:
        """Read a file written by :meth:`save` (refuses other safetensors files)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise TaskvecError(f"task-vector file {path} does not exist")
        try:
            with safe_open(str(path), "pt", device=str(device or "cpu")) as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise TaskvecError(f"{path} is not a taskvec task vector (metadata format="
                                       f"{meta.get('format')!r}, expected {FORMAT!r})")
                deltas = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)
        except TaskvecError:
            raise
        except Exception as e:  # noqa: BLE001  (corrupted header, not safetensors)
            raise TaskvecError(f"{path}: cannot read as safetensors ({e})") from None
        heads = {}
        hp = path.with_name(path.name.removesuffix(".safetensors") + ".head.safetensors")
        if hp.exists():
            from safetensors.torch import load_file

            heads = load_file(str(hp))
        return cls(deltas, base_fingerprint=meta.get("base_fingerprint") or None, scope=meta.get("scope", ""),
                   task=meta.get("task", ""), base_model=meta.get("base_model", ""), heads=heads)

    # -- arithmetic
    def _check_compatible(self, other: TaskVector) -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"cannot combine TaskVector with {type(other).__name__}")
        if self.base_fingerprint and other.base_fingerprint and self.base_fingerprint != other.base_fingerprint:
            raise BaseMismatchError(f"task vectors of different bases: {self.task or '?'} has base "
                                    f"{self.base_fingerprint}, {other.task or '?'} has {other.base_fingerprint}")
        for k in self.deltas.keys() & other.deltas.keys():
            if self.deltas[k].shape != other.deltas[k].shape:
                raise ShapeMismatchError(f"tensor {k!r}: shapes {tuple(self.deltas[k].shape)} vs "
                                         f"{tuple(other.deltas[k].shape)}")

    def _new(self, deltas, task=None, scope=None) -> TaskVector:
        return TaskVector(deltas, base_fingerprint=self.base_fingerprint, scope=self.scope if scope is None else scope,
                          task=self.task if task is None else task, base_model=self.base_model)

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self
        self._check_compatible(other)
        out = {k: v.clone() for k, v in self.deltas.items()}
        for k, v in other.deltas.items():
            out[k] = out[k] + v if k in out else v.clone()
        scope = self.scope if self.scope == other.scope else "+".join(sorted({self.scope, other.scope}))
        tasks = "+".join(t for t in (self.task, other.task) if t)
        v = self._new(out, tasks, scope)
        v.base_fingerprint = self.base_fingerprint or other.base_fingerprint
        return v

    __radd__ = __add__

    def __neg__(self):
        return self._new({k: -v for k, v in self.deltas.items()}, f"-{self.task}" if self.task else "")

    def __sub__(self, other):
        return self + (-other)

    def __mul__(self, c):
        if not isinstance(c, (int, float)):
            return NotImplemented
        return self._new({k: v * c for k, v in self.deltas.items()})

    __rmul__ = __mul__

    def __truediv__(self, c):
        return self * (1.0 / c)

    # -- geometry (float64 accumulation)
    def dot(self, other: TaskVector) -> float:
        """Σ over shared tensors of ⟨τ1, τ2⟩ (float64)."""
        self._check_compatible(other)
        return float(sum((self.deltas[k].double() * other.deltas[k].double()).sum()
                         for k in self.deltas.keys() & other.deltas.keys()))

    def norm(self, p: float = 2) -> float:
        """Norm of the flattened vector (float64): p=2 Euclidean, p=1, p=inf."""
        if p == 2:
            return math.sqrt(sum(float((v.double() ** 2).sum()) for v in self.deltas.values()))
        if p == 1:
            return float(sum(float(v.double().abs().sum()) for v in self.deltas.values()))
        if p == math.inf:
            return max((float(v.abs().max()) for v in self.deltas.values()), default=0.0)
        raise ValueError(f"unsupported norm p={p}; valid: 1, 2, inf")

    def norms(self) -> dict[str, float]:
        """Euclidean norm of each tensor."""
        return {k: float(v.double().norm()) for k, v in self.deltas.items()}

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity of the flattened vectors (0 when either is zero)."""
        d = self.norm() * other.norm()
        return self.dot(other) / d if d > 0 else 0.0

    @staticmethod
    def cosine_matrix(vectors: Iterable[TaskVector]) -> np.ndarray:
        """(T, T) matrix of pairwise cosines."""
        vs = list(vectors)
        m = np.eye(len(vs))
        for i in range(len(vs)):
            for j in range(i + 1, len(vs)):
                m[i, j] = m[j, i] = vs[i].cosine(vs[j])
        return m

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.deltas.values())

    def __repr__(self) -> str:
        return (f"TaskVector(task={self.task!r}, scope={self.scope!r}, tensors={len(self.deltas)}, "
                f"numel={self.numel:,}, norm={self.norm():.4g}, base={self.base_fingerprint})")

    # -- application
    @torch.no_grad()
    def apply_to(self, model, coef: float = 1.0, check_base: bool = True):
        """Add ``coef·τ`` to ``model``'s backbone in place and return ``model``.

        ``model``: a TaskModel, a transformers model (backbone or head model), or a directory (loaded as a
        TaskModel when it has ``head.json``, else as ``AutoModel``). Refuses a model whose base fingerprint
        differs (``check_base=False`` to skip, e.g. to stack vectors onto an already edited model).
        """
        if isinstance(model, (str, os.PathLike)):
            from .modeling import load_backbone, load_task_model

            model = load_task_model(model) if (Path(model) / "head.json").exists() else load_backbone(model)
        bb = _backbone_of(model)
        params = dict(bb.named_parameters())
        if check_base and self.base_fingerprint:
            fp = state_fingerprint({k: v for k, v in bb.state_dict().items() if v.is_floating_point()},
                                   getattr(bb, "config", None))
            if fp != self.base_fingerprint:
                raise BaseMismatchError(f"task vector {self.task or ''} was extracted from base "
                                        f"{self.base_fingerprint} but the model's base is {fp}; pass "
                                        "check_base=False to apply it anyway")
        for k, d in self.deltas.items():
            if k not in params:
                raise TaskvecError(f"tensor {k!r} of the task vector is not a parameter of "
                                   f"{type(bb).__name__}")
            p = params[k]
            if p.shape != d.shape:
                raise ShapeMismatchError(f"tensor {k!r}: task vector shape {tuple(d.shape)} vs model shape "
                                         f"{tuple(p.shape)}")
            p.add_(d.to(p.device, p.dtype), alpha=coef)
        return model


def _peft_key_to_backbone(key: str) -> str:
    for pre in ("base_model.model.",):
        key = key.removeprefix(pre)
    key = key.removeprefix("backbone.")
    for pre in ("bert.", "roberta.", "model.", "transformer.", "gpt_neox.", "distilbert."):
        # head models (e.g. BertForSequenceClassification) prefix the backbone
        if key.startswith(pre) and (".layer" in key or ".h." in key or "layers." in key):
            return key[len(pre):]
    return key


def _peft_to_backbone_name(module_name: str, peft_model) -> str:
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    name = module_name
    for pre in ("base_model.model.",):
        name = name.removeprefix(pre)
    if hasattr(inner, "backbone") and name.startswith("backbone."):
        return name[len("backbone."):]
    prefix = getattr(inner, "base_model_prefix", "")
    if prefix and name.startswith(prefix + ".") and getattr(inner, "base_model", inner) is not inner:
        return name[len(prefix) + 1:]
    return name


def _unmerged_fingerprint(peft_model) -> str:
    """Fingerprint of the base weights under a peft model (the LoRA layers' base weights)."""
    inner = peft_model.get_base_model()
    bb = _backbone_of(inner)
    state = {}
    for k, v in bb.state_dict().items():
        if not v.is_floating_point() or "lora_" in k or "modules_to_save" in k:
            continue
        state[k.replace(".base_layer.", ".").replace("original_module.", "")] = v
    return state_fingerprint(state, getattr(bb, "config", None))
