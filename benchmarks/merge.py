"""taskvec merge vs mergekit-yaml on a 0.5B-parameter Llama checkpoint (issue 5).

Builds, from a fixed seed, a Llama-architecture base (fp32, hidden 1536, intermediate 4096, 16 layers,
12 heads, vocabulary 32,000, untied LM head: 0.55B parameters, 1 GB shards) and three "fine-tunes"
(base + 0.01·N(0, 1) noise per entry), then runs the same ``task_arithmetic`` and ``ties`` merges with
``taskvec.merge`` and with ``mergekit-yaml`` (installed in a separate virtualenv; never a taskvec
dependency), each in its own process under ``/usr/bin/time`` (wall time and peak RSS, imports included),
and prints from that one run: time and peak-RSS ratios taskvec/mergekit and how the merged tensors differ.

    python benchmarks/merge.py --work /tmp/tvbench --mergekit /tmp/mk-venv/bin/mergekit-yaml

About 9 GB of inputs and 4 GB of outputs go to ``--work`` (inputs are reused across runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
              num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
              rms_norm_eps=1e-5)
SHARD = 1_000_000_000


def tensor_specs():
    h, i, v, L = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], CONFIG["num_hidden_layers"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for layer in range(L):
        p = f"model.layers.{layer}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        specs += [(p + f"self_attn.{n}.weight", (h, h)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        specs += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def build(path: Path, model: int) -> None:
    """Write model ``model`` (0 = base, 1..3 = fine-tunes) as 1 GB safetensors shards."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "model.safetensors.index.json").is_file():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LlamaConfig(**CONFIG, architectures=["LlamaForCausalLM"]).save_pretrained(tmp)
    cur, size, weight_map = {}, 0, {}

    def flush():
        fname = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(cur, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in cur})

    for idx, (name, shape) in enumerate(tensor_specs()):
        g = torch.Generator().manual_seed(1000 * idx)
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        if model:
            t += 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(1000 * idx + model))
        if cur and size + t.numel() * 4 > SHARD:
            flush()
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 4
    flush()
    total = sum(4 * torch.Size(s).numel() for _, s in tensor_specs())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    os.replace(tmp, path)


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a command, via /usr/bin/time -v."""
    t0 = time.time()
    with open(log, "w") as fh:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    text = log.read_text()
    if r.returncode:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    rss_kb = int(next(line for line in text.splitlines() if "Maximum resident set size" in line).split()[-1])
    return wall, rss_kb / 1024**2


def compare(a: Path, b: Path, work: Path | None = None, density: float | None = None) -> dict:
    """Tensor-by-tensor comparison of two merged directories.

    With ``work``/``density`` (TIES), every differing entry is checked against the tie explanation: it
    must sit where some task's |τ_t| equals that task's top-k threshold exactly (k = int(density·n)), the
    only place where taskvec's tie rule and mergekit's unstable argsort may choose differently.
    """
    from taskvec.merge.engine import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    assert set(ca.info) == set(cb.info), set(ca.info) ^ set(cb.info)
    srcs = [Checkpoint(work / n) for n in ("base", "ft1", "ft2", "ft3")] if work else None
    identical = differing_tensors = differing_entries = total = at_ties = 0
    max_abs = 0.0
    for k in ca.info:
        x, y = ca.get(k), cb.get(k)
        total += x.numel()
        if torch.equal(x, y):
            identical += 1
            continue
        differing_tensors += 1
        diff = (x != y).reshape(-1)
        differing_entries += int(diff.sum())
        max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
        if srcs:
            pos = torch.nonzero(diff).squeeze(1)
            base = srcs[0].get(k).reshape(-1)
            tied = torch.zeros(pos.numel(), dtype=torch.bool)
            for ft in srcs[1:]:
                tau = (ft.get(k).reshape(-1) - base).abs()
                n = tau.numel()
                v = torch.kthvalue(tau, n - int(density * n) + 1).values
                tied |= tau[pos] == v
            at_ties += int(tied.sum())
    out = {"tensors": len(ca.info), "bit_identical_tensors": identical, "differing_tensors": differing_tensors,
           "differing_entries": differing_entries, "entries": total, "max_abs_diff": max_abs}
    if srcs:
        out["differing_entries_at_exact_threshold_ties"] = at_ties
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/tvbench")
    ap.add_argument("--mergekit", default="/tmp/mk-venv/bin/mergekit-yaml")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--density", type=float, default=0.5)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for m in range(4):
        build(work / ("base" if m == 0 else f"ft{m}"), m)
    print(f"inputs ready in {time.time() - t0:.0f} s: 4 × {sum(torch.Size(s).numel() for _, s in tensor_specs()) / 1e9:.3f}B "
          "fp32 parameters", flush=True)
    results = {}
    for method in args.methods.split(","):
        params = {"weight": 1.0} | ({"density": args.density} if method == "ties" else {})
        cfg = {"merge_method": method, "base_model": str(work / "base"), "dtype": "float32",
               "models": [{"model": str(work / f"ft{m}"), "parameters": params} for m in (1, 2, 3)]}
        import yaml

        cfg_path = work / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        out_tv, out_mk = work / f"out_taskvec_{method}", work / f"out_mergekit_{method}"
        for d in (out_tv, out_mk):
            shutil.rmtree(d, ignore_errors=True)
        for f in (work / "base", *(work / f"ft{m}" for m in (1, 2, 3))):  # warm the page cache
            for s in f.glob("*.safetensors"):
                with open(s, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
        tv_cmd = [sys.executable, "-c", "import sys; from taskvec.merge import merge; "
                  "merge(sys.argv[1], sys.argv[2], show_progress=False, shard_size=1_000_000_000)",
                  str(cfg_path), str(out_tv)]
        mk_cmd = [args.mergekit, str(cfg_path), str(out_mk), "--out-shard-size", "250M", "--no-copy-tokenizer",
                  "--quiet"]  # 250M fp32 parameters = 1 GB shards, as taskvec
        tv = timed(tv_cmd, work / f"taskvec_{method}.log")
        print(f"{method}: taskvec {tv[0]:.1f} s, {tv[1]:.2f} GiB", flush=True)
        mk = timed(mk_cmd, work / f"mergekit_{method}.log")
        print(f"{method}: mergekit {mk[0]:.1f} s, {mk[1]:.2f} GiB", flush=True)
        diff = compare(out_tv, out_mk, work if method == "ties" else None, args.density)
        results[method] = {"taskvec_s": tv[0], "mergekit_s": mk[0], "time_ratio": tv[0] / mk[0],
                           "taskvec_rss_gib": tv[1], "mergekit_rss_gib": mk[1], "rss_ratio": tv[1] / mk[1], **diff}
        print(json.dumps({method: results[method]}, indent=1), flush=True)
        shutil.rmtree(out_tv, ignore_errors=True)
        shutil.rmtree(out_mk, ignore_errors=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print("\nmethod            time taskvec/mergekit   peak RSS taskvec/mergekit   merged tensors")
    for m, r in results.items():
        print(f"{m:17s} {r['taskvec_s']:6.1f}/{r['mergekit_s']:6.1f} s = {r['time_ratio']:.2f}   "
              f"{r['taskvec_rss_gib']:.2f}/{r['mergekit_rss_gib']:.2f} GiB = {r['rss_ratio']:.2f}   "
              f"{r['bit_identical_tensors']}/{r['tensors']} bit-identical, {r['differing_entries']} of "
              f"{r['entries']} entries differ (max |diff| {r['max_abs_diff']:.3g})"
              + (f", {r['differing_entries_at_exact_threshold_ties']} of them at exact magnitude ties at a "
                 "task's top-k threshold" if "differing_entries_at_exact_threshold_ties" in r else ""))


if __name__ == "__main__":
    main()
