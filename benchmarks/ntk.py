"""Benchmark: exact Q/K/V empirical NTK of MiniLM (sequence length 128, o = 1) against two baselines.

Same model, same inputs, same kernel (trace of a 1-output head = the kernel itself), one run:

* ``ours``      — :func:`taskvec.ntk.empirical_ntk` (exact: torch.func per-example gradients, float64 Gram
                  tiles; row blocks with recomputation when ``--max-memory`` is below the whole Jacobian);
* ``tutorial``  — the PyTorch torch.func "neural tangent kernels" tutorial's Jacobian contraction:
                  ``vmap(jacrev)`` on both arguments, then a per-parameter ``einsum('Naf,Mbf->NMab')`` (fp32);
* ``floor``     — one batched forward + backward pass over the same examples, gradients w.r.t. W_Q, W_K,
                  W_V only (what any gradient-based method must at least do).

Prints times, ratios, the relative difference of the kernels (goal ≤ 1e-5), peak GPU memory, and the
achieved FLOP rate as a fraction of the device's fp32 peak (TF32 off). ``--sketch N`` also times sketched
features (k = ``--sketch-dim``) for N examples.

    python benchmarks/ntk.py --n 256                       # CPU
    python benchmarks/ntk.py --device cuda --n 2000 --n-large 10000 --sketch 100000 --model .carry/minilm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from taskvec.modeling import HeadSpec, LinearHead, TaskModel
from taskvec.ntk import (
    _default_chunk,
    _Jacobian,
    additive_mask,
    empirical_ntk,
    jacobian_features,
    select_params,
    tf32_disabled,
)

PEAK_FP32 = {"H100 80GB HBM3": 66.9e12, "H100 PCIe": 51.2e12, "H100": 66.9e12, "H200": 66.9e12,
             "A100": 19.5e12}


def device_peak(dev: torch.device) -> tuple[float, str]:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for k, v in PEAK_FP32.items():
            if k in name:
                return v, f"{name} fp32 (non-tensor-core) peak {v / 1e12:.1f} TFLOP/s"
        return float("nan"), name
    cores = torch.get_num_threads()
    ghz = 2.5
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    ghz = float(line.split(":")[1]) / 1000
                    break
    except OSError:
        pass
    peak = cores * ghz * 1e9 * 32  # AVX2: 2 FMA units × 8 fp32 lanes × 2 FLOP
    return peak, f"CPU {cores} threads × {ghz:.2f} GHz × 32 FLOP/cycle (AVX2 FMA, assumed) = {peak / 1e12:.2f} TFLOP/s"


def load_model(path: str | None, dev) -> TaskModel:
    from transformers import AutoModel

    if path:
        bb = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    else:
        from taskvec.modeling import load_backbone

        bb = load_backbone("minilm")
    torch.manual_seed(0)
    model = TaskModel(bb, LinearHead(bb.config.hidden_size, 1), HeadSpec("linear", "mean", 1))
    return model.float().to(dev).eval()


def make_inputs(n: int, L: int, vocab: int, dev, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, L), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids.to(dev), "attention_mask": torch.ones(n, L, dtype=torch.long, device=dev)}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class _RSSPeak:
    """Peak resident memory of this process while a block runs (CPU), sampled every 10 ms from /proc."""

    def __enter__(self):
        import threading

        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


CPU_SECONDS: dict = {}  # last call's process CPU time (user + system, all threads), by label


def timed(fn, dev, label=None):
    """(result, seconds, peak bytes): GPU: peak allocated; CPU: peak RSS above the RSS before the call.

    Also records the process CPU time in ``CPU_SECONDS[label]``: on a shared machine wall time includes
    waiting for a core, CPU time does not (it does include cache and memory-bandwidth contention)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(dev)
    with _RSSPeak() as rss:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        sync(dev)
        dt = time.perf_counter() - t
        CPU_SECONDS[label] = time.process_time() - c
    mem = torch.cuda.max_memory_allocated() if dev.type == "cuda" else rss.peak - rss.base
    return out, dt, mem


def floor_pass(model, x, sels, batch):
    """Batched forward + backward, gradients w.r.t. the selected tensors only; returns the gradients."""
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    ps = [named[s.name] for s in sels]
    for p in ps:
        p.requires_grad_(True)
    grads = None
    n = x["input_ids"].shape[0]
    for a in range(0, n, batch):
        out = model(x["input_ids"][a:a + batch], x["attention_mask"][a:a + batch]).sum()
        g = torch.autograd.grad(out, ps)
        grads = g if grads is None else [u + v for u, v in zip(grads, g)]
    for p in ps:
        p.requires_grad_(False)
    return grads


def floor_flops(model, x, sels, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    sub = {k: v[:batch] for k, v in x.items()}
    with FlopCounterMode(display=False) as fc:
        floor_pass(model, sub, sels, batch)
    return fc.get_total_flops() * x["input_ids"].shape[0] / sub["input_ids"].shape[0]


def tutorial_ntk(model, x1, x2, sels):
    """The torch.func tutorial's 'Jacobian contraction' eNTK (fp32), on the same per-example function."""
    from torch.func import functional_call, jacrev, vmap

    jf = _Jacobian(model, sels, "logits", 1)
    params = jf.params

    def fnet_single(p, ids, m4):
        return functional_call(jf.wrapped, p, (ids[None], torch.ones_like(ids)[None], None, m4[None]))[0]

    def jac(x):
        m4 = additive_mask(x["attention_mask"], False, torch.float32)
        j = vmap(jacrev(fnet_single), (None, 0, 0))(params, x["input_ids"], m4)
        return [v.flatten(2) for v in j.values()]

    j1 = jac(x1)
    j2 = jac(x2)
    return torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(j1, j2)]).sum(0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="backbone directory (default: the minilm wheel)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=None, help="examples per gradient call (default: the library's)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating ours/tutorial timings (medians reported)")
    ap.add_argument("--floor-batch", type=int, default=None)
    ap.add_argument("--max-memory", default=None, help="exact-mode Jacobian budget, e.g. 12GB")
    ap.add_argument("--schedule", default="auto", choices=["auto", "activations", "jacobian"],
                    help="exact-mode store between gradient passes and the Gram (see taskvec.ntk.empirical_ntk)")
    ap.add_argument("--no-tutorial", action="store_true")
    ap.add_argument("--n-large", type=int, default=0, help="also time exact at this n (ours only)")
    ap.add_argument("--sketch", type=int, default=0, help="also time sketched features for this many examples")
    ap.add_argument("--sketch-dim", type=int, default=8192)
    ap.add_argument("--project-batch", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    chunk = a.chunk or _default_chunk(dev)
    fb = a.floor_batch or (256 if cuda else 32)
    model = load_model(a.model, dev)
    sels = select_params(model, "qkv")
    p = sum(s.numel for s in sels)
    peak, peak_desc = device_peak(dev)
    print(f"device: {torch.cuda.get_device_name(dev) if cuda else 'cpu'} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | MiniLM qkv p = {p:,} | L = {a.seq_len} | o = 1 | chunk {chunk}")
    res: dict = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "p": p, "seq_len": a.seq_len,
                 "chunk": chunk, "torch": torch.__version__, "peak_desc": peak_desc}
    x = make_inputs(a.n, a.seq_len, model.config.vocab_size, dev)
    with tf32_disabled():
        # warm-up (kernels, allocator) on a few examples
        w = {k: v[: min(8, a.n)] for k, v in x.items()}
        empirical_ntk(model, w, kernel="trace", groups=False, chunk_size=chunk)
        floor_pass(model, w, sels, fb)
        flops_floor = floor_flops(model, x, sels, min(fb, 8))
        _, t_floor, m_floor = timed(lambda: floor_pass(model, x, sels, fb), dev, "floor")
        flops = flops_floor + 2.0 * a.n * a.n * p  # per-example grads ≈ the floor's matmuls, + the Gram
        res.update({"n": a.n, "floor_s": t_floor, "floor_peak_bytes": m_floor, "flops_floor": flops_floor,
                    "flops_ours": flops, "floor_flop_rate": flops_floor / t_floor, "peak_flops": peak,
                    "repeats": a.repeats, "runs": [], "floor_cpu_s": CPU_SECONDS["floor"]})
        def mem(m):
            return f"{m / 2**30:.2f} GiB" + ("" if cuda else " RSS")

        print(f"n = {a.n}: floor (batched fwd+bwd, qkv grads, batch {fb}) {t_floor:.3f} s (CPU time "
              f"{CPU_SECONDS['floor']:.1f} s) | peak {mem(m_floor)}")
        # ours and the tutorial alternate (ours, tutorial, ours, tutorial, ...): on a shared machine both
        # see the same load, and the ratio of the medians is the comparison
        t_ours_all, t_tut_all = [], []
        for rep in range(a.repeats):
            r_ours, t_ours, m_ours = timed(lambda: empirical_ntk(model, x, kernel="trace", groups=False,
                                                                 chunk_size=a.chunk, max_memory=a.max_memory,
                                                                 schedule=a.schedule),
                                             dev, "ours")
            K = r_ours.kernel
            t_ours_all.append(t_ours)
            run = {"ours_s": t_ours, "ours_cpu_s": CPU_SECONDS["ours"], "ours_peak_bytes": m_ours,
                   "load_before_tutorial": os.getloadavg()[0]}
            print(f"  [{rep + 1}/{a.repeats}] ours exact {t_ours:.3f} s (CPU time {CPU_SECONDS['ours']:.1f} s; "
                  f"{t_ours / t_floor:.2f}x floor) | peak "
                  f"{mem(m_ours)} | {r_ours.info}", flush=True)
            if not a.no_tutorial:
                try:
                    Kt, t_tut, m_tut = timed(lambda: tutorial_ntk(model, x, x, sels), dev, "tutorial")
                    Kt = Kt[:, :, 0, 0].double().cpu()
                    rd = float((K - Kt).norm() / Kt.norm())
                    t_tut_all.append(t_tut)
                    c_tut = CPU_SECONDS["tutorial"]
                    run.update({"tutorial_s": t_tut, "tutorial_cpu_s": c_tut, "tutorial_peak_bytes": m_tut,
                                "rel_diff": rd})
                    print(f"  [{rep + 1}/{a.repeats}] tutorial (vmap(jacrev) both args + einsum): {t_tut:.3f} s "
                          f"(CPU time {c_tut:.1f} s) -> ours is {t_tut / t_ours:.2f}x faster (CPU time: "
                          f"{c_tut / run['ours_cpu_s']:.2f}x) | rel diff ours vs tutorial {rd:.2e} "
                          f"({'ok' if rd <= 1e-5 else 'FAIL'} ≤ 1e-5) | peak {mem(m_tut)}", flush=True)
                    del Kt
                except torch.OutOfMemoryError as e:
                    run["tutorial_error"] = "out of memory"
                    print(f"  tutorial: out of memory at n = {a.n} ({str(e).splitlines()[0][:120]})")
                if cuda:
                    torch.cuda.empty_cache()
            res["runs"].append(run)
        t_ours = sorted(t_ours_all)[len(t_ours_all) // 2]
        res.update({"ours_s": t_ours, "ours_info": r_ours.info, "ours_flop_rate": flops / t_ours,
                    "load_avg_end": os.getloadavg()})
        print(f"  ours (median of {len(t_ours_all)}): {t_ours:.3f} s = {t_ours / t_floor:.2f}x floor | FLOPs: floor "
              f"{flops_floor:.3e}, ours {flops:.3e} (floor + 2·n²·p Gram) -> ours {flops / t_ours / 1e12:.2f} TFLOP/s "
              f"= {flops / t_ours / peak:.1%} of peak; floor {flops_floor / t_floor / 1e12:.2f} TFLOP/s = "
              f"{flops_floor / t_floor / peak:.1%} ({peak_desc})")
        if t_tut_all:
            t_tut = sorted(t_tut_all)[len(t_tut_all) // 2]
            med = (lambda v: sorted(v)[len(v) // 2])
            cpu_ratio = med([r["tutorial_cpu_s"] for r in res["runs"] if "tutorial_cpu_s" in r]) / med(
                [r["ours_cpu_s"] for r in res["runs"]])
            res["speedup_vs_tutorial_cpu_time"] = cpu_ratio
            res.update({"tutorial_s": t_tut, "speedup_vs_tutorial": t_tut / t_ours,
                        "rel_diff": max(r["rel_diff"] for r in res["runs"] if "rel_diff" in r)})
            print(f"  tutorial (median of {len(t_tut_all)}): {t_tut:.3f} s -> ours is {t_tut / t_ours:.2f}x faster "
                  f"(per pair: {', '.join(f'{u / o:.2f}x' for o, u in zip(t_ours_all, t_tut_all))}; by CPU time "
                  f"{cpu_ratio:.2f}x) | load average "
                  f"now {os.getloadavg()[0]:.1f}")
        if a.n_large:
            xl = make_inputs(a.n_large, a.seq_len, model.config.vocab_size, dev, seed=1)
            _, tf_l, _ = timed(lambda: floor_pass(model, xl, sels, fb), dev)
            rl, tl, ml = timed(lambda: empirical_ntk(model, xl, kernel="trace", groups=False, chunk_size=chunk,
                                                     max_memory=a.max_memory, schedule=a.schedule), dev)
            fl = flops_floor * a.n_large / a.n + 2.0 * a.n_large**2 * p
            res.update({"n_large": a.n_large, "large_s": tl, "large_floor_s": tf_l, "large_peak_bytes": ml,
                        "large_info": rl.info, "large_flop_rate": fl / tl})
            print(f"n = {a.n_large}: ours exact {tl:.2f} s (floor {tf_l:.2f} s; {tl / tf_l:.2f}x) | "
                  f"{fl / tl / 1e12:.2f} TFLOP/s = {fl / tl / peak:.1%} of peak | {rl.info}"
                  + (f" | peak mem {ml / 2**30:.2f} GiB" if cuda else ""))
            del rl, xl
        if a.sketch:
            xs = make_inputs(a.sketch, a.seq_len, model.config.vocab_size, dev, seed=2)
            fs, ts, ms = timed(lambda: jacobian_features(model, xs, mode="sketch", sketch_dim=a.sketch_dim,
                                                         chunk_size=chunk, project_batch=a.project_batch), dev)
            fl = flops_floor * a.sketch / a.n + 2.0 * a.sketch * p * a.sketch_dim
            res.update({"sketch_n": a.sketch, "sketch_dim": a.sketch_dim, "sketch_s": ts, "sketch_peak_bytes": ms,
                        "sketch_flop_rate": fl / ts})
            print(f"sketch: n = {a.sketch}, k = {a.sketch_dim}: {ts:.1f} s | features {tuple(fs.features.shape)} | "
                  f"{fl / ts / 1e12:.2f} TFLOP/s = {fl / ts / peak:.1%} of peak"
                  + (f" | peak mem {ms / 2**30:.2f} GiB" if cuda else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return res


if __name__ == "__main__":
    main()
