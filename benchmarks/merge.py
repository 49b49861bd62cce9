"""taskvec merge vs mergekit-yaml on a 0.5B-parameter Llama checkpoint (issue 5).

Builds, from a fixed seed, a Llama-architecture base (fp32, hidden 1536, intermediate 4096, 16 layers,
12 heads, vocabulary 32,000, untied LM head: 0.55B parameters, 1 GB shards) and three "fine-tunes"
(base + 0.01·N(0, 1) noise per entry), then runs the same ``task_arithmetic`` and ``ties`` merges with
``taskvec.merge`` and with ``mergekit-yaml`` (installed in a separate virtualenv; never a taskvec
dependency), each in its own process under ``/usr/bin/time`` (wall time and peak RSS, imports included),
and prints from that one run: time and peak-RSS ratios taskvec/mergekit and how the merged tensors differ.

Beside them, in the same run: an **I/O floor** (a process that reads every input tensor and writes an
output of the merged size with plain ``safetensors``, no arithmetic: what any merge must at least spend)
and the **import time** of each tool (``import taskvec.merge`` vs ``import mergekit.merge``), so the ratios
are printed with and without imports. Methods: ``task_arithmetic``, ``ties``, ``slerp`` (base and ft1,
t = 0.4), ``model_stock`` and ``della`` (stochastic: compared by statistics of the kept entries, not bits).

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


FLOOR = r"""
import sys, json
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
inputs, out = [Path(a) for a in sys.argv[1:-1]], Path(sys.argv[-1])
index = json.loads((inputs[0] / "model.safetensors.index.json").read_text())["weight_map"]
out.mkdir(parents=True, exist_ok=True)
for shard in sorted(set(index.values())):
    tensors = {}
    for i, d in enumerate(inputs):
        with safe_open(str(d / shard), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if i == 0:
                    tensors[k] = t
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
"""


def method_config(method: str, work: Path, density: float) -> dict:
    """The YAML of one benchmarked merge (mergekit's schema; taskvec reads the same file)."""
    models = [1] if method == "slerp" else [1, 2, 3]
    params = {"weight": 1.0}
    if method in ("ties", "della"):
        params["density"] = density
    if method == "della":
        params["epsilon"] = 0.1
    cfg = {"merge_method": method, "base_model": str(work / "base"), "dtype": "float32",
           "models": [{"model": str(work / f"ft{m}"), "parameters": params} for m in models]}
    if method == "slerp":
        cfg["parameters"] = {"t": 0.4}
        cfg["models"] = [{"model": str(work / "base")}, {"model": str(work / "ft1")}]
    if method == "model_stock":
        cfg["models"] = [{"model": str(work / f"ft{m}")} for m in models]
    if method == "della":
        cfg["parameters"] = {"lambda": 1.0}
    return cfg


def della_statistics(out: Path, work: Path, density: float) -> dict:
    """DELLA is stochastic: the share of entries the merge moved away from the base, and the merged Δ's
    mean and RMS, over a few large tensors (the two tools draw different masks from the same rule)."""
    from taskvec.merge.engine import Checkpoint

    ca, cb = Checkpoint(out), Checkpoint(work / "base")
    names = [n for n, _ in tensor_specs() if n.endswith(("q_proj.weight", "down_proj.weight"))][:6]
    moved = total = 0
    s1 = s2 = 0.0
    for k in names:
        d = ca.get(k).double() - cb.get(k).double()
        moved += int((d != 0).sum())
        total += d.numel()
        s1 += float(d.sum())
        s2 += float((d * d).sum())
    return {"moved_share": moved / total, "delta_mean": s1 / total, "delta_rms": (s2 / total) ** 0.5}


def import_seconds(python: str, module: str, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times of ``python -c 'import module'``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.time()
        subprocess.run([python, "-c", f"import {module}"], check=True, capture_output=True)
        best = min(best, time.time() - t0)
    return best


def warm(work: Path) -> None:
    """Read every input once so each timed process finds them in the page cache."""
    for f in (work / "base", *(work / f"ft{m}" for m in (1, 2, 3))):
        for s in f.glob("*.safetensors"):
            with open(s, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/tvbench")
    ap.add_argument("--mergekit", default="/tmp/mk-venv/bin/mergekit-yaml")
    ap.add_argument("--methods", default="task_arithmetic,ties,slerp,model_stock,della")
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
    mk_python = str(Path(args.mergekit).with_name("python"))
    imports = {"taskvec": import_seconds(sys.executable, "taskvec.merge"),
               "mergekit": import_seconds(mk_python, "mergekit.merge")}
    print(f"imports: taskvec.merge {imports['taskvec']:.2f} s, mergekit.merge {imports['mergekit']:.2f} s", flush=True)
    import yaml

    for method in args.methods.split(","):
        cfg = method_config(method, work, args.density)
        cfg_path = work / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        out_tv, out_mk, out_floor = work / f"out_taskvec_{method}", work / f"out_mergekit_{method}", work / "out_floor"
        for d in (out_tv, out_mk, out_floor):
            shutil.rmtree(d, ignore_errors=True)
        inputs = [work / "base"] + [Path(m["model"]) for m in cfg["models"] if Path(m["model"]) != work / "base"]
        warm(work)
        floor = timed([sys.executable, "-c", FLOOR, *map(str, inputs), str(out_floor)], work / f"floor_{method}.log")
        shutil.rmtree(out_floor, ignore_errors=True)
        print(f"{method}: I/O floor ({len(inputs)} inputs) {floor[0]:.1f} s, {floor[1]:.2f} GiB", flush=True)
        tv_cmd = [sys.executable, "-c", "import sys; from taskvec.merge import merge; "
                  "merge(sys.argv[1], sys.argv[2], show_progress=False, shard_size=1_000_000_000)",
                  str(cfg_path), str(out_tv)]
        mk_cmd = [args.mergekit, str(cfg_path), str(out_mk), "--out-shard-size", "250M", "--no-copy-tokenizer",
                  "--quiet"]  # 250M fp32 parameters = 1 GB shards, as taskvec
        warm(work)
        tv = timed(tv_cmd, work / f"taskvec_{method}.log")
        print(f"{method}: taskvec {tv[0]:.1f} s, {tv[1]:.2f} GiB", flush=True)
        warm(work)
        mk = timed(mk_cmd, work / f"mergekit_{method}.log")
        print(f"{method}: mergekit {mk[0]:.1f} s, {mk[1]:.2f} GiB", flush=True)
        if method == "della":
            diff = {"taskvec": della_statistics(out_tv, work, args.density),
                    "mergekit": della_statistics(out_mk, work, args.density)}
        else:
            diff = compare(out_tv, out_mk, work if method == "ties" else None, args.density)
        tv_x, mk_x = tv[0] - imports["taskvec"], mk[0] - imports["mergekit"]
        results[method] = {"taskvec_s": tv[0], "mergekit_s": mk[0], "floor_s": floor[0],
                           "time_ratio": tv[0] / mk[0], "time_ratio_without_imports": tv_x / mk_x,
                           "floor_ratio": tv[0] / floor[0], "taskvec_rss_gib": tv[1], "mergekit_rss_gib": mk[1],
                           "floor_rss_gib": floor[1], "rss_ratio": tv[1] / mk[1], "comparison": diff}
        print(json.dumps({method: results[method]}, indent=1), flush=True)
        shutil.rmtree(out_tv, ignore_errors=True)
        shutil.rmtree(out_mk, ignore_errors=True)
    results["imports_s"] = imports
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nimports: taskvec.merge {imports['taskvec']:.2f} s, mergekit.merge {imports['mergekit']:.2f} s "
          "(included in the times below)")
    print("method          taskvec/mergekit time         without imports   taskvec/I-O floor   "
          "peak RSS taskvec/mergekit   merged tensors")
    for m, r in results.items():
        if m == "imports_s":
            continue
        c = r["comparison"]
        if "taskvec" in c:
            same = (f"kept {c['taskvec']['moved_share']:.4f} vs {c['mergekit']['moved_share']:.4f}, "
                    f"Δ rms {c['taskvec']['delta_rms']:.3g} vs {c['mergekit']['delta_rms']:.3g}")
        else:
            same = (f"{c['bit_identical_tensors']}/{c['tensors']} bit-identical, {c['differing_entries']} of "
                    f"{c['entries']} entries differ (max |diff| {c['max_abs_diff']:.3g})"
                    + (f", {c['differing_entries_at_exact_threshold_ties']} at exact top-k ties"
                       if "differing_entries_at_exact_threshold_ties" in c else ""))
        print(f"{m:15s} {r['taskvec_s']:6.1f}/{r['mergekit_s']:6.1f} s = {r['time_ratio']:.2f}   "
              f"{r['time_ratio_without_imports']:.2f}   {r['taskvec_s']:.1f}/{r['floor_s']:.1f} s = {r['floor_ratio']:.2f}   "
              f"{r['taskvec_rss_gib']:.2f}/{r['mergekit_rss_gib']:.2f} GiB = {r['rss_ratio']:.2f}   {same}")


if __name__ == "__main__":
    main()
