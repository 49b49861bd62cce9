"""What a merge did: :class:`MergeResult`, and ``OUT/README.md``, the model card of a merged directory
(written with the rest of ``OUT``, atomically).

It records the base model, the inputs (name, kind, path), the method and its resolved parameters (the
``merge_config.yaml`` record), the taskvec version and date, and how to load the result: plain
``transformers`` for the model, :func:`taskvec.load_task_model` for the task heads under ``heads/``, peft
for a LoRA adapter output. ``extra`` (``merge(..., card_extra=...)``) is appended verbatim, e.g. a
validation's predicted and measured accuracies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .config import dump_yaml

TASKVEC_HEADS = ("linear", "label_words", "mlp")


@dataclass
class MergeResult:
    """What :func:`merge` did (also written as ``OUT/merge_config.yaml``)."""

    out_dir: str
    method: str
    inputs: list[dict]
    tensors_merged: int
    tensors_copied: int
    heads: list[str]
    seconds: float

    def __repr__(self) -> str:
        names = ", ".join(i["name"] for i in self.inputs)
        heads = f", heads: {', '.join(self.heads)}" if self.heads else ""
        return (f"MergeResult({self.method} of {len(self.inputs)} inputs [{names}] -> {self.out_dir}: "
                f"{self.tensors_merged} tensors merged, {self.tensors_copied} copied{heads}; {self.seconds:.1f} s)")

    def _repr_html_(self) -> str:
        import html

        rows = "".join(f"<tr><td>{html.escape(i['name'])}</td><td>{html.escape(i['kind'])}</td>"
                       f"<td>{html.escape(i['path'])}</td></tr>" for i in self.inputs)
        return (f"<p><b>{html.escape(self.method)}</b> → <code>{html.escape(self.out_dir)}</code>: "
                f"{self.tensors_merged} tensors merged, {self.tensors_copied} copied, {self.seconds:.1f} s</p>"
                f"<table><tr><th>input</th><th>kind</th><th>path</th></tr>{rows}</table>")


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def model_card(out, tmp: Path, record: dict, heads: list[str], *, base_dir: Path | None = None,
               adapter: bool = False, layers=None, extra: str | None = None) -> str:
    """Markdown of the card for the merge written into ``tmp`` (renamed to ``out`` afterwards).

    Args:
        record: the resolved config with ``inputs`` (what ``merge_config.yaml`` holds).
        heads: task names with a head under ``tmp/heads/``.
        base_dir: the base model's directory (its architecture names the loading class of an adapter).
        adapter: the output is a peft LoRA adapter (``lora_rank``), not a model.
        layers: passthrough only: ``(out start, out end, model, src start, src end)`` per slice.
    """
    from .. import __version__

    out = str(out)
    method = record["method"]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lib = "peft" if adapter else "transformers"
    lines = ["---", f"library_name: {lib}", "tags:", "- taskvec", "- merge", f"- {method}", "---", "",
             f"# {Path(out).name}", "",
             f"A `{method}` merge of {len(record['inputs'])} input(s), written by taskvec {__version__} on {date}.",
             "", "## Base model", ""]
    base = record.get("base_model")
    if layers is not None and base is not None:
        lines.append(f"`{base}`: config.json, tokenizer and the non-layer tensors (embeddings, final norm, LM head).")
    elif layers is not None:
        lines.append(f"None given: config.json, tokenizer and embeddings from the first slice's model "
                     f"`{layers[0][2]}`, final norm and LM head from the last slice's `{layers[-1][2]}` (as mergekit).")
    else:
        lines.append(f"`{base}` (θ0: the merge is θ0 + Δ; config.json and tokenizer are copied from it).")
    lines += ["", "## Inputs", "", "| name | kind | path |", "|---|---|---|"]
    lines += [f"| {_cell(i['name'])} | {_cell(i['kind'])} | `{_cell(i['path'])}` |" for i in record["inputs"]]
    if layers is not None:
        lines += ["", "## Layers", "", "| output layers | from model | its layers |", "|---|---|---|"]
        lines += [f"| {a}–{b - 1} | `{_cell(m)}` | {sa}–{sb - 1} |" for a, b, m, sa, sb in layers]
        lines += ["", f"{layers[-1][1]} layers in all (`num_hidden_layers` in config.json)."]
    lines += ["", "## Method and parameters", "",
              f"Method `{method}`; the resolved configuration (also in `merge_config.yaml`):", "",
              "```yaml", dump_yaml(record).rstrip(), "```", "", "## How to load it", "", "```python"]
    cfg_file = (base_dir if adapter and base_dir is not None else tmp) / "config.json"
    arch = json.loads(cfg_file.read_text()).get("architectures") if cfg_file.is_file() else None
    causal = any(str(a).endswith("ForCausalLM") for a in arch or [])
    if adapter:
        auto = "AutoModelForCausalLM" if causal else "AutoModel"
        lines += ["from peft import PeftModel", f"from transformers import {auto}", "",
                  f"model = PeftModel.from_pretrained({auto}.from_pretrained({str(base_dir or base)!r}), {out!r})"]
    else:
        lines += ["from transformers import AutoModel" + (", AutoModelForCausalLM" if causal else ""), "",
                  f"model = AutoModel.from_pretrained({out!r})"]
        if causal:
            lines.append(f"lm = AutoModelForCausalLM.from_pretrained({out!r})  # with the LM head")
    lines.append("```")
    loadable, raw = [], []
    for h in heads:
        p = tmp / "heads" / h / "head.json"
        kind = json.loads(p.read_text()).get("kind") if p.is_file() else None
        (loadable if kind in TASKVEC_HEADS else raw).append(h)
    if loadable:
        first = f"{out}/heads/{loadable[0]}"
        lines += ["", f"Task heads ({', '.join(f'`{h}`' for h in loadable)}) with the merged backbone:", "",
                  "```python", "import taskvec", "",
                  f"task_model = taskvec.load_task_model({first!r}, backbone={out!r})",
                  "logits = task_model(input_ids, attention_mask)", "```"]
    if raw:
        lines += ["", (f"`heads/{{{','.join(raw)}}}/head.safetensors` hold the inputs' own tensors outside the "
                       "base model (e.g. `classifier.*`), as saved, with their source in `head.json`; they are not "
                       "taskvec task heads, so `taskvec.load_task_model` does not read them.")]
    if extra:
        lines += ["", extra.rstrip()]
    return "\n".join(lines) + "\n"


__all__ = ["MergeResult", "model_card"]
