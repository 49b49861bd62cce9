"""A fine-tuned checkpoint's own classification head, read as a taskvec ``mlp`` head.

Checkpoints made elsewhere (``AutoModelForSequenceClassification`` directories, peft adapters with a
``modules_to_save`` head) carry their task head beside the backbone. :func:`read_head` finds it from the
tensor names alone and returns it as a :class:`~taskvec.modeling.HeadSpec` of kind ``mlp`` plus its
weights, so the θ0 task model is the *base* backbone with the checkpoint's head (never merged):

=====================================  =============================================  ==========  ========
checkpoint tensors                     layers                                         activation  pooling
=====================================  =============================================  ==========  ========
``score.weight`` (decoders)            score                                          –           last
``classifier.dense`` + ``out_proj``    dense, out_proj (RoBERTa, XLM-R; ELECTRA)      tanh; gelu  cls
``pre_classifier`` + ``classifier``    pre_classifier, classifier (DistilBERT)        relu        cls
``classifier`` + ``<prefix>.pooler``   pooler.dense, classifier (BERT family)         tanh        cls
=====================================  =============================================  ==========  ========

A BERT checkpoint's pooler belongs to the head (a peft adapter without it uses the base model's pooler).
Output rows are permuted into the data's label order: label names come from ``config.id2label`` where it
names them; a checkpoint whose label set differs from the data's is an error naming both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import TaskvecError
from .modeling import HeadSpec

GENERIC_LABEL = re.compile(r"LABEL_\d+")


class HeadError(TaskvecError):
    """A checkpoint's head cannot be read or does not fit the task's labels."""


def _config(d: Path) -> dict:
    p = d / "config.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise HeadError(f"{p}: not valid JSON ({e})") from None


def _find(names, *suffixes) -> str | None:
    """The shortest name ending with ``suffixes[0]`` (a head tensor: its module path may carry a prefix)."""
    hits = sorted((n for n in names if n.endswith(suffixes[0])), key=len)
    return hits[0] if hits else None


def _layers(get, names: list[str], model_type: str, base_get, base_names: list[str]):
    """``([(weight, bias|None), ...], activations, pooling, source description)`` of the head."""
    if (w := _find(names, "score.weight")) is not None:
        return [(get(w), None)], [], "last", "score"
    dense, out = _find(names, "classifier.dense.weight"), _find(names, "classifier.out_proj.weight")
    if dense and out:
        act = "gelu" if model_type == "electra" else "tanh"
        return ([(get(dense), get(dense[:-6] + "bias")), (get(out), get(out[:-6] + "bias"))], [act], "cls",
                "classifier.dense + classifier.out_proj")
    pre = _find(names, "pre_classifier.weight")
    cls = _find(names, "classifier.weight")
    if pre and cls:
        return [(get(pre), get(pre[:-6] + "bias")), (get(cls), get(cls[:-6] + "bias"))], ["relu"], "cls", \
            "pre_classifier + classifier"
    if cls:
        pool = _find(names, "pooler.dense.weight")
        src, g = "checkpoint", get
        if pool is None:
            pool, src, g = _find(base_names, "pooler.dense.weight"), "base model", base_get
        if pool is None:
            raise HeadError("a 'classifier' head needs the BERT pooler (pooler.dense.*), found in neither the "
                            "checkpoint nor the base model")
        return ([(g(pool), g(pool[:-6] + "bias")), (get(cls), get(cls[:-6] + "bias"))], ["tanh"], "cls",
                f"pooler.dense ({src}) + classifier")
    raise HeadError("no classification head found (expected score.weight, classifier.*, or pre_classifier.*)")


def _label_order(ckpt_labels: list[str] | None, data_labels: list[str], n_rows: int, where: str) -> list[int]:
    """Row of the checkpoint's output for each of the data's labels, in the data's order."""
    if n_rows != len(data_labels):
        raise HeadError(f"{where}: the head has {n_rows} outputs but the data has {len(data_labels)} labels "
                        f"({', '.join(data_labels)})")
    named = ckpt_labels is not None and not all(GENERIC_LABEL.fullmatch(x) for x in ckpt_labels)
    if not named:
        if all(x.isdigit() for x in data_labels) and sorted(map(int, data_labels)) == list(range(n_rows)):
            return [int(x) for x in data_labels]  # the data's labels are the checkpoint's ids
        return list(range(n_rows))  # unnamed outputs: taken in the data's label order
    if all(x.isdigit() for x in data_labels) and sorted(map(int, data_labels)) == list(range(n_rows)):
        return [int(x) for x in data_labels]
    if sorted(ckpt_labels) != sorted(data_labels):
        raise HeadError(f"{where}: the checkpoint's labels ({', '.join(ckpt_labels)}, from config.id2label) differ "
                        f"from the data's ({', '.join(data_labels)})")
    return [ckpt_labels.index(x) for x in data_labels]


def read_head(source, base_dir, label_names: list[str], task: str = "") -> tuple[HeadSpec, dict[str, torch.Tensor]]:
    """The classification head of ``source`` as ``(HeadSpec(kind="mlp"), {layers.i.weight/bias: tensor})``.

    Args:
        source: an ``AutoModelForSequenceClassification`` directory (safetensors) or a peft adapter
            directory whose ``modules_to_save`` hold the head.
        base_dir: the base model's directory (the pooler of a BERT adapter without one; label names of an
            adapter come from here too).
        label_names: the data's labels, in the task's order: the head's rows are permuted into it.
    Raises:
        HeadError naming the file and what was expected.
    """
    from .merge.checkpoint import Checkpoint
    from .merge.lora import LoraAdapter
    from .merge.methods import MergeError

    source, base_dir = Path(source), Path(base_dir)
    try:
        base = Checkpoint(base_dir)
        if (source / "adapter_config.json").is_file():
            ad = LoraAdapter(source, Checkpoint)
            names = list(ad.full)

            def get(n):
                return ad.ckpt.get(ad.full[n]).clone()

            cfg = _config(source) or _config(base_dir)
        else:
            ck = Checkpoint(source)
            names = list(ck.info)

            def get(n):
                return ck.get(n).clone()

            cfg = _config(source)
        layers, acts, pooling, desc = _layers(get, names, cfg.get("model_type", ""),
                                              lambda n: base.get(n).clone(), list(base.info))
    except MergeError as e:
        raise HeadError(f"{source}: {e}") from None
    except HeadError as e:
        raise HeadError(f"{source}: {e}") from None
    except KeyError as e:
        raise HeadError(f"{source}: head tensor {e} is missing") from None
    id2label = cfg.get("id2label")
    ckpt_labels = [id2label[k] for k in sorted(id2label, key=int)] if isinstance(id2label, dict) else None
    rows = _label_order(ckpt_labels, list(label_names), layers[-1][0].shape[0], str(source))
    w, b = layers[-1]
    layers[-1] = (w[rows], None if b is None else b[rows])
    state = {}
    for i, (w, b) in enumerate(layers):
        state[f"layers.{i}.weight"] = w.float().contiguous()
        if b is not None:
            state[f"layers.{i}.bias"] = b.float().contiguous()
    dims = [layers[0][0].shape[1]] + [w.shape[0] for w, _ in layers]
    spec = HeadSpec(kind="mlp", pooling=pooling, num_labels=len(label_names), label_names=list(label_names),
                    task=task, dims=[int(x) for x in dims], activations=acts, bias=layers[0][1] is not None,
                    source=f"{source} ({desc})")
    return spec, state


def write_head(dest, spec: HeadSpec, state: dict[str, torch.Tensor]) -> Path:
    """``dest/head.json`` + ``dest/head.safetensors`` (the task-model head format, read by
    :func:`taskvec.modeling.load_task_model`)."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dest / "head.safetensors"), metadata={"format": "pt"})
    (dest / "head.json").write_text(json.dumps(spec.__dict__, indent=2) + "\n")
    return dest




def read_lm_head(source, base_dir, task, kind: str) -> tuple[HeadSpec, dict[str, torch.Tensor]]:
    """The LM head of a causal-LM checkpoint for a task scored by likelihood (objective ``lm`` or ``choice``),
    as ``(HeadSpec(kind="lm"), state)``: with tied embeddings no tensor (the backbone's embedding is the
    head); untied, the checkpoint's own ``lm_head.weight`` (a peft adapter: the base model's). Raises
    :class:`HeadError` for a checkpoint that is not a causal LM."""
    from .merge.checkpoint import Checkpoint
    from .merge.methods import MergeError

    source, base_dir = Path(source), Path(base_dir)
    cfg = (_config(base_dir) if kind == "adapter" else _config(source)) or _config(base_dir)
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise HeadError(f"{source}: a task scored by likelihood needs a causal LM checkpoint (…ForCausalLM); "
                        f"this one is {', '.join(archs)}")
    tied = bool(cfg.get("tie_word_embeddings", True))
    state = {}
    where = base_dir if kind == "adapter" else source
    if not tied:
        try:
            ck = Checkpoint(where)
            name = _find(list(ck.info), "lm_head.weight")
            if name is None:
                raise HeadError(f"{where}: untied embeddings but no lm_head.weight tensor")
            state["weight"] = ck.get(name).float().contiguous()
        except MergeError as e:
            raise HeadError(f"{where}: {e}") from None
    words = list(task.label_words or task.label_names)
    spec = HeadSpec(kind="lm", pooling="none", num_labels=task.num_labels, label_names=list(task.label_names),
                    label_words=words, token_ids=[], prompt=task.prompt, tied=tied, task=task.name,
                    source=f"{where} ({'tied input embedding' if tied else 'lm_head.weight'})")
    return spec, state


__all__ = ["HeadError", "read_head", "read_lm_head", "write_head"]
