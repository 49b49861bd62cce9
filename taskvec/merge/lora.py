"""LoRA adapters as exact weight deltas ΔW = scaling·B·A, and back to LoRA by truncated SVD.

peft's element-wise combinations (``add_weighted_adapter`` with ``ties``, ``linear`` on A and B, ...)
average the factors, which is not the average of the products. taskvec merges the products: each
adapter contributes its full ΔW to the merge of every target matrix, and a merged ΔW can be
re-factorised to a LoRA of a chosen rank (the best rank-r approximation in Frobenius norm).

Conventions (peft's): A has shape (r, in), B has shape (out, r); ``scaling = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override r and alpha
per module; with ``fan_in_fan_out`` (GPT-2 ``Conv1D``, weight stored as (in, out)) ΔW = (B·A)ᵀ·scaling;
embeddings (``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r)) give (B·A)ᵀ·scaling.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .methods import MergeError

PEFT_PREFIX = "base_model.model."


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's LoRA scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, transpose: bool = False) -> torch.Tensor:
    """ΔW = scaling·B·A, transposed when ``transpose`` (fan_in_fan_out layers and embeddings).

    Args:
        A: (r, in). B: (out, r). scaling: float.
    Returns:
        (out, in), or (in, out) with ``transpose``; float32 (float64 if an input is float64).
    """
    work = torch.float64 if torch.float64 in (A.dtype, B.dtype) else torch.float32
    d = (B.to(work) @ A.to(work)) * scaling
    return d.T.contiguous() if transpose else d


def factorize(delta: torch.Tensor, rank: int, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` LoRA factors of ``delta`` (truncated SVD, singular values split evenly).

    Args:
        delta: (out, in) matrix (or (in, out) with ``transpose``, the layout of :func:`lora_delta`).
        rank: target rank r ≥ 1 (capped at min(out, in)).
    Returns:
        ``(A, B)`` with A (r, in), B (out, r) and B·A the best rank-r approximation (scaling 1).
    """
    M = delta.T if transpose else delta
    work = torch.float64 if M.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(M.to(work), full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    return (root[:, None] * Vh[:r]).contiguous(), (U[:, :r] * root).contiguous()


def _pattern_value(pattern: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class _Target:
    a_key: str
    b_key: str
    scaling: float
    kind: str  # "linear", "fifo" (fan_in_fan_out) or "embedding"

    @property
    def transpose(self) -> bool:
        return self.kind != "linear"


class LoraAdapter:
    """A peft LoRA adapter directory, read lazily.

    ``targets`` maps a weight name relative to the model peft wrapped (e.g.
    ``model.layers.0.self_attn.q_proj.weight``) to its factors; ``full`` maps other saved tensors
    (``modules_to_save`` copies, trained biases) to their keys: they replace the base tensor whole.
    """

    def __init__(self, path, checkpoint_factory):
        self.path = Path(path)
        cfg_path = self.path / "adapter_config.json"
        try:
            self.config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergeError(f"{cfg_path}: cannot read adapter config ({e})") from None
        if self.config.get("peft_type", "LORA") != "LORA":
            raise MergeError(f"{self.path}: peft_type {self.config.get('peft_type')!r}; only LORA adapters merge")
        if self.config.get("use_dora"):
            raise MergeError(f"{self.path}: DoRA adapters are not supported (their ΔW depends on the base norm)")
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            if not (self.path / "adapter_model.bin").is_file():
                raise MergeError(f"{self.path}: no adapter_model.safetensors (the adapter's weights)")
            from ..modeling import pickle_is_allowed

            if not pickle_is_allowed():
                raise MergeError(f"{self.path}: only pickle adapter weights (adapter_model.bin); safetensors are "
                                 "read. Convert once: PeftModel.from_pretrained(base, dir).save_pretrained(dir, "
                                 "safe_serialization=True); or pass --allow-pickle (torch.load(weights_only=True))")
            weights = self.path  # the directory's .bin, read whole by the checkpoint (pickle allowed)
        self.ckpt = checkpoint_factory(weights)
        self.targets: dict[str, _Target] = {}
        self.full: dict[str, str] = {}
        alpha0 = self.config.get("lora_alpha", 8)
        rs, fifo = bool(self.config.get("use_rslora")), bool(self.config.get("fan_in_fan_out"))
        pairs: dict[str, dict[str, str]] = {}
        for key in self.ckpt.info:
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)"
                             r"(?:\.[^.]+)?", name)
            if m:
                module = m.group(1) or m.group(3)
                kind = m.group(2) or m.group(4)
                pairs.setdefault(module, {})[kind] = key
            elif ".base_layer." in name:
                continue  # peft's copy of an untouched base weight (saved with embedding targets)
            elif ".lora_" in name:
                raise MergeError(f"{weights}: unsupported LoRA tensor {key!r}")
            else:
                self.full[name.replace(".modules_to_save", "")] = key
        for module, p in pairs.items():
            emb = "lora_embedding_A" in p or "lora_embedding_B" in p
            a_key = p.get("lora_embedding_A" if emb else "lora_A")
            b_key = p.get("lora_embedding_B" if emb else "lora_B")
            if a_key is None or b_key is None:
                raise MergeError(f"{weights}: module {module!r} has only one of its LoRA factors")
            shape_a = self.ckpt.info[a_key][0]
            if len(shape_a) != 2:
                raise MergeError(f"{weights}: module {module!r}: LoRA factors of shape {shape_a} (convolutions) "
                                 "are not supported")
            r = shape_a[0]
            alpha = _pattern_value(self.config.get("alpha_pattern"), module, alpha0)
            kind = "embedding" if emb else ("fifo" if fifo else "linear")
            self.targets[module + ".weight"] = _Target(a_key, b_key, lora_scaling(alpha, r, rs), kind)

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of the target weight ``name`` (peft-relative), float32."""
        t = self.targets[name]
        return lora_delta(self.ckpt.get(t.a_key), self.ckpt.get(t.b_key), t.scaling, t.transpose)

    def delta_shape(self, name: str) -> tuple[int, ...]:
        t = self.targets[name]
        out, r = self.ckpt.info[t.b_key][0]
        r2, inp = self.ckpt.info[t.a_key][0]
        if r != r2:
            raise MergeError(f"{self.path}: LoRA factors of {name!r} have ranks {r2} (A) and {r} (B)")
        return (inp, out) if t.transpose else (out, inp)


def write_adapter(out_dir: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor, str]], rank: int,
                  base_model: str, dtype: torch.dtype | None = None) -> None:
    """Write a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        factors: peft-relative weight name → (A (r, in), B (out, r), kind) with kind "linear", "fifo"
            or "embedding" (as :class:`LoraAdapter` targets); scaling is 1 (lora_alpha = r), so B·A is
            the delta itself (transposed for fifo/embedding, peft's convention).
        rank: r written to the config; smaller factors are padded with zeros.
    """
    from safetensors.torch import save_file

    kinds = {k for _, _, k in factors.values()}
    if {"fifo", "linear"} <= kinds:
        raise MergeError("cannot write one adapter mixing fan_in_fan_out and ordinary linear targets")
    state, targets = {}, []
    for name, (A, B, kind) in factors.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        targets.append(module)
        if A.shape[0] < rank:
            A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], 1)
        emb = kind == "embedding"
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        state[f"{PEFT_PREFIX}{module}.{a_name}"] = A.to(dtype or A.dtype).contiguous()
        state[f"{PEFT_PREFIX}{module}.{b_name}"] = B.to(dtype or B.dtype).contiguous()
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(targets),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": "fifo" in kinds, "use_rslora": False,
              "base_model_name_or_path": base_model, "inference_mode": True, "task_type": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
