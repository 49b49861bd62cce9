"""Merges of models with different vocabularies or embedding tying (``tokenizer_source``).

``tokenizer_source`` says which vocabulary the merged model has, as mergekit's key of that name does:

* ``base``: the base's tokenizer;
* ``union``: the base's tokenizer plus every token another model has and the base lacks (appended as
  added tokens, as mergekit does), then the models' added tokens (special tokens keep their flags);
* ``model:NAME``: the tokenizer of input ``NAME`` (an input's ``name`` or its path; mergekit writes the
  model's path alone, which is accepted too).

Every model's vocabulary tensors (the input embedding, the LM head and its bias) are permuted into the
output vocabulary *before* the merge method sees them; a token a model lacks gets, in that model, the
row mergekit 0.1.5 gives it (``PermutedVocabulary`` / ``assign_embedding_sources``): the row of the one
model that has the token, else the base's row if the base has it, else the mean of the rows of the
models that have it (zero when none has it). So a token only one fine-tune has ends up with that
fine-tune's row in every merge, and a token every model but one has is merged as if that model agreed
with the base (or with the mean of the others when the base lacks it).

Tied embeddings: a model whose LM head is its input embedding (no LM-head tensor, ``tie_word_embeddings``)
takes part with its embedding as its LM head whenever another model (the base or an input) has an LM head
of its own; the merged model then has an untied LM head (``tie_word_embeddings: false``). When every model
is tied the output stays tied. This is done even without ``tokenizer_source`` when the vocabularies are the
same (a tied base with untied fine-tunes, or the reverse). Without a ``tokenizer_source``, different
vocabularies stay an error (:mod:`taskvec.merge.engine`).

:func:`resolve` builds a :class:`VocabPlan` from headers, configs and tokenizers only; the engine reads
the models through :meth:`VocabPlan.checkpoint` (a view of a :class:`~taskvec.merge.checkpoint.Checkpoint`
whose vocabulary tensors are the permuted ones) and :meth:`VocabPlan.save` writes the merged tokenizer and
``config.json`` (``vocab_size``, ``tie_word_embeddings``) into the output.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .methods import MergeError

SOURCES = ("base", "union", "model:NAME")
INPUT_HINTS = ("embed_tokens", "word_embeddings", "wte", "embed_in", "shared")
HEAD_HINTS = ("lm_head", "embed_out")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def parse_source(value, models) -> str | None:
    """The config's ``tokenizer_source`` checked and normalised: ``None``, ``"base"``, ``"union"`` or
    ``"model:NAME"`` with NAME an input's name (given as its name or its path). Raises :class:`MergeError`."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MergeError(f"tokenizer_source: expected one of {', '.join(SOURCES)}, got {value!r}")
    if value in ("base", "union"):
        return value
    ref = value[len("model:"):] if value.startswith("model:") else value
    for m in models:
        if ref in (m.name, m.path) or (ref and Path(ref).resolve() == Path(m.path).resolve()):
            return f"model:{m.name}"
    names = ", ".join(m.name for m in models) or "none"
    raise MergeError(f"tokenizer_source: {value!r} is not base, union, or model:NAME of an input (inputs: {names})")


def mergekit_source(source: str | None, models) -> str | None:
    """``tokenizer_source`` as mergekit writes it (a model is named by its path)."""
    if source is None or source in ("base", "union"):
        return source
    name = source[len("model:"):]
    return next(m.path for m in models if m.name == name)


# --- one model's vocabulary tensors --------------------------------------------------------------------


@dataclass
class _Model:
    name: str
    path: Path
    ckpt: Checkpoint
    rows: int  # rows of its vocabulary tensors
    keys: dict[str, str] = field(default_factory=dict)  # kind ("embed", "head", "bias") -> key in ckpt
    tied: bool = False  # its LM head is its embedding (no head tensor)
    vocab: dict | None = None  # token -> row (None: not loaded, or the base's)
    perm: torch.Tensor | None = None  # output id -> its row, -1 where it lacks the token
    tok: object = None  # its tokenizer (with a tokenizer_source)


def _vocab_keys(ckpt: Checkpoint) -> dict[str, str]:
    keys = {}
    for k, (shape, _) in ckpt.info.items():
        if len(shape) == 2 and "embed" not in keys and any(h in k for h in INPUT_HINTS):
            keys["embed"] = k
        elif len(shape) == 2 and "head" not in keys and any(h in k for h in HEAD_HINTS):
            keys["head"] = k
    if "head" in keys:
        bias = keys["head"].rsplit(".", 1)[0] + ".bias"
        if bias in ckpt.info and len(ckpt.info[bias][0]) == 1:
            keys["bias"] = bias
    return keys


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    except json.JSONDecodeError as e:
        raise MergeError(f"{path / 'config.json'}: invalid JSON ({e})") from None


def _is_tied(path: Path, cfg: dict) -> bool:
    if "tie_word_embeddings" in cfg:
        return bool(cfg["tie_word_embeddings"])
    try:  # the architecture's default
        from transformers import AutoConfig

        return bool(getattr(AutoConfig.from_pretrained(str(path)), "tie_word_embeddings", False))
    except Exception:  # noqa: BLE001 - no usable config: not known to be tied
        return False


def _model(name: str, path: Path, ckpt: Checkpoint) -> _Model | None:
    keys = _vocab_keys(ckpt)
    if "embed" not in keys:
        return None
    cfg = _config(path)
    rows = ckpt.shape(keys["embed"])[0]
    return _Model(name, path, ckpt, rows, keys, tied="head" not in keys and _is_tied(path, cfg))


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is this model's tokenizer's fault
        raise MergeError(f"cannot load the tokenizer of {path} for tokenizer_source ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                                               "spiece.model"))


def _vocab(tok, rows: int, vocab_size) -> dict:
    limit = min(rows, vocab_size or rows)
    return {t: i for t, i in tok.get_vocab().items() if i < limit}


# --- the plan -------------------------------------------------------------------------------------------


class VocabPlan:
    """The output vocabulary, each model's permutation into it, and the tying of the output."""

    def __init__(self, models: list[_Model], n_out: int, untie: bool, head_name: str | None, source: str | None,
                 tokenizer=None, tokenizer_dir: Path | None = None):
        self.models = models  # [0] is the base
        self.n_out = n_out
        self.untie = untie  # the output has an LM head; tied models contribute their embedding
        self.head_name = head_name
        self.source = source
        self.tokenizer = tokenizer  # union: the merged tokenizer object
        self.tokenizer_dir = tokenizer_dir  # model:NAME: copy that model's tokenizer files
        self.base_rows = models[0].rows
        self._cache: tuple[str, list] | None = None

    @property
    def changes_vocab(self) -> bool:
        b = self.models[0]
        return self.n_out != b.rows or not torch.equal(b.perm, torch.arange(self.n_out))

    def kinds(self, m: _Model) -> dict[str, str]:
        """kind -> key of the tensors this model presents permuted (a tied model's virtual LM head too)."""
        keys = dict(m.keys)
        if self.untie and "head" not in keys:
            keys["head"] = self.head_name
        return keys

    @property
    def base(self):
        """The base as the engine reads it (permuted, with a virtual LM head when the output unties)."""
        return _View(self, 0)

    def checkpoint(self, name: str, path: Path, ckpt: Checkpoint):
        """The view of an input model (or the base) that the engine reads: permuted vocabulary tensors."""
        for i, m in enumerate(self.models):
            if m.path == path and (i == 0 or m.name == name):
                return _View(self, i)
        hit = sorted(_vocab_keys(ckpt).values()) if self.changes_vocab else []
        if hit:  # a task-vector file: its rows are in the base's vocabulary, with no tokenizer to map them
            raise self._refuse(name, path, "task-vector file", hit[0])
        return ckpt

    def _refuse(self, name, path, kind, key) -> MergeError:
        return MergeError(f"input {name!r} ({path}) is a {kind} that changes the vocabulary tensor {key!r} in the "
                          f"base's vocabulary; with tokenizer_source {self.source} the vocabulary changes, and only "
                          "model directories (with their tokenizers) can be permuted into it")

    def check_inputs(self, inputs) -> None:
        """Refuse task-vector files and adapters that change vocabulary tensors when the vocabulary moves."""
        if not self.changes_vocab:
            return
        vocab_names = set(self.kinds(self.models[0]).values())
        for inp in inputs:
            if inp.kind == "model":
                continue
            hit = sorted(vocab_names & (set(inp.keys) | set(inp.lora)))
            if hit:
                raise self._refuse(inp.name, inp.path, "LoRA adapter" if inp.kind == "lora" else "task-vector file",
                                   hit[0])

    def tensor(self, i: int, kind: str) -> torch.Tensor:
        """Model ``i``'s tensor ``kind`` in the output vocabulary, missing rows filled (mergekit's rule)."""
        if self._cache is None or self._cache[0] != kind:
            self._cache = None
            self._cache = (kind, self._fill(kind))
        return self._cache[1][i]

    def _fill(self, kind: str) -> list:
        idx = [i for i, m in enumerate(self.models) if kind in self.kinds(m)]
        outs: list = [None] * len(self.models)
        present, rows = [], []
        for i in idx:
            m = self.models[i]
            key = m.keys.get(kind) or m.keys["embed"]  # a tied model's LM head is its embedding
            raw = m.ckpt.get(key)
            has = m.perm >= 0
            x = raw[m.perm.clamp(min=0)].to(torch.float32)
            x[~has] = 0
            present.append(has)
            rows.append(x)
            outs[i] = raw.dtype
        P = torch.stack(present)  # models × tokens
        cnt = P.sum(0)
        S = torch.stack(rows).sum(0)
        default = S / cnt.clamp(min=1).to(S.dtype).view(-1, *([1] * (S.dim() - 1)))
        if idx and idx[0] == 0:  # the base has this tensor: its rows where it has the token
            base_has = P[0]
            default[base_has] = rows[0][base_has]
        for j, i in enumerate(idx):
            x = rows[j]
            x[~present[j]] = default[~present[j]]
            outs[i] = x.to(outs[i])
        return outs

    def save(self, dest: Path) -> None:
        """The merged tokenizer and ``config.json`` (vocab_size, tie_word_embeddings) into ``dest``."""
        if self.tokenizer is not None or self.tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                if (dest / f).is_file():
                    (dest / f).unlink()
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(dest))
            else:
                for f in TOKENIZER_FILES:
                    if (self.tokenizer_dir / f).is_file():
                        shutil.copy2(self.tokenizer_dir / f, dest / f)
        cfg_path = dest / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            cfg["vocab_size"] = self.n_out
            if self.untie:
                cfg["tie_word_embeddings"] = False
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    def record(self) -> dict:
        """What ``merge_config.yaml`` records about the vocabulary."""
        return {"tokenizer_source": self.source, "vocab_size": self.n_out, "lm_head": "untied" if self.untie else
                ("tied" if any(m.tied for m in self.models) else "none")}


class _View:
    """A checkpoint whose vocabulary tensors are model ``i``'s permuted ones (shapes and data)."""

    def __init__(self, plan: VocabPlan, i: int):
        m = plan.models[i]
        self._plan, self._i, self._ckpt = plan, i, m.ckpt
        self.path, self.metadata = m.ckpt.path, m.ckpt.metadata
        self.where, self.info = dict(m.ckpt.where), dict(m.ckpt.info)
        self._kinds = {key: kind for kind, key in plan.kinds(m).items()}
        for key, kind in self._kinds.items():
            src = m.keys.get(kind) or m.keys["embed"]
            shape, dt = m.ckpt.info[src]
            self.info[key] = ((plan.n_out, *shape[1:]), dt)
            self.where[key] = m.ckpt.where[src]

    def get(self, name: str) -> torch.Tensor:
        kind = self._kinds.get(name)
        return self._ckpt.get(name) if kind is None else self._plan.tensor(self._i, kind)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name][0]


def resolve(cfg, base_dir: Path, base: Checkpoint) -> VocabPlan | None:
    """The :class:`VocabPlan` of a merge, or ``None`` when nothing needs permuting or untying.

    Reads headers, ``config.json`` files and (with a ``tokenizer_source``) tokenizers, no tensor data.
    Without a ``tokenizer_source`` only the tying is reconciled, and only between models of the base's
    row count (anything else is left to the engine's vocabulary checks).
    """
    from .engine import _kind

    source = getattr(cfg, "tokenizer_source", None)
    bm = _model("base", base_dir, base)
    if bm is None:
        return None
    models = [bm]
    for spec in cfg.models:
        path = Path(spec.path)
        if not path.exists() or _kind(path) != "model":
            continue
        m = _model(spec.name, path, Checkpoint(path))
        if m is not None:
            models.append(m)
    untie = any("head" in m.keys for m in models) and any(m.tied for m in models)
    head_name = next((m.keys["head"] for m in models if "head" in m.keys), None)
    if source is None:
        if not untie or any(m.rows != bm.rows for m in models):
            return None
        for m in models:
            m.perm = torch.arange(bm.rows)
        return VocabPlan(models, bm.rows, untie, head_name, None)
    # the vocabularies (token -> row) of every model; a model without tokenizer files has the base's
    base_tok = _tokenizer(base_dir)
    for m in models:
        vs = _config(m.path).get("vocab_size")
        if m is bm:
            tok = base_tok
        elif _has_tokenizer(m.path):
            tok = _tokenizer(m.path)
        elif m.rows == bm.rows:
            tok = base_tok
        else:
            raise MergeError(f"{m.path} has no tokenizer files, and its {m.rows} embedding rows are not the base's "
                             f"{bm.rows}: cannot map them into tokenizer_source {source}")
        m.vocab = _vocab(tok, m.rows, vs)
        m.tok = tok
    tokenizer, tok_dir = None, None
    if source == "base":
        out, n_out, src = bm.vocab, bm.rows, bm
    elif source.startswith("model:"):
        src = next((m for m in models if m is not bm and m.name == source[len("model:"):]), None)
        if src is None:
            raise MergeError(f"tokenizer_source {source}: that input is not a model directory with an embedding")
        out, n_out, tok_dir = src.vocab, src.rows, src.path
    else:
        tokenizer = _union(base_tok, models)
        out, src = tokenizer.get_vocab(), None
        n_out = max(out.values()) + 1
    for m in models:
        perm = torch.full((n_out,), -1, dtype=torch.long)
        for t, i in out.items():
            j = m.vocab.get(t)
            if j is not None and i < n_out:
                perm[i] = j
        if m is src:  # rows of the source past its tokenizer (padding) are its own
            pad = torch.arange(n_out)
            perm = torch.where(perm < 0, pad, perm)
        m.perm = perm
    if all(m.rows == n_out and torch.equal(m.perm, torch.arange(n_out)) for m in models) and not untie:
        return None
    return VocabPlan(models, n_out, untie, head_name, source, tokenizer, tok_dir)


def _union(base_tok, models: list[_Model]):
    """mergekit's union tokenizer: the base's, then every other model's tokens the base lacks as added
    tokens (in model order, each model's in id order: mergekit follows its tokenizer's dict order), then
    the models' added tokens (their settings from the first model that has them)."""
    import copy

    res = copy.deepcopy(base_tok)
    have = set(res.get_vocab())
    added: dict[str, object] = {}
    new = []
    for m in models:
        dec = m.tok.added_tokens_decoder
        specials = {info.content for i, info in dec.items()}
        for t, i in sorted(m.vocab.items(), key=lambda kv: kv[1]):
            if t not in specials and t not in have:
                new.append(t)
                have.add(t)
        for i, info in sorted(dec.items()):
            if i < m.rows and info.content not in added:
                added[info.content] = info
    if new:
        res.add_tokens(new)  # as mergekit: plain strings (normalized added tokens)
    for t, info in added.items():
        if t not in have:
            res.add_tokens([info], special_tokens=bool(getattr(info, "special", False)))
            have.add(t)
    return res


__all__ = ["SOURCES", "VocabPlan", "mergekit_source", "parse_source", "resolve"]
