"""CUDA checks (run with `make test-gpu` / `pytest -m gpu` on a machine with a GPU)."""

import pytest
import torch
from conftest import toy_task

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_finetune_and_validate_on_cuda(tiny_bert, tmp_path):
    from taskvec.finetune import FinetuneConfig, extract_vectors, finetune
    from taskvec.merge import MergeSpec
    from taskvec.validation import validate_run

    cfg = FinetuneConfig(max_steps=12, eval_every=6, lr=3e-3, test_size=24, val_size=12, device="cuda")
    res = finetune(tiny_bert, [toy_task("a"), toy_task("b", seed=1)], tmp_path / "run", cfg, progress=False)
    assert all(0 <= r.test_accuracy <= 1 for r in res)
    vs = extract_vectors(tmp_path / "run")
    assert all(v.deltas[k].device.type == "cpu" for v in vs.values() for k in v.deltas)
    r = validate_run(tmp_path / "run", merges=[MergeSpec("ta", "task_arithmetic", {"lambda": 0.5})], n_eval=24,
                     n_kernel=8, rank=2, lambdas=[0.5], device="cuda", progress=False)
    assert r["device"].startswith("cuda") and r["summary"]["n_predictions"] == 2 * 3


def test_jvp_on_cuda_matches_cpu():
    from transformers import BertConfig, BertModel

    from taskvec.linearize import jvp_batch
    from taskvec.modeling import HeadSpec, LinearHead, TaskModel

    torch.manual_seed(0)
    bb = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=32, attn_implementation="eager"))
    m = TaskModel(bb, LinearHead(16, 3), HeadSpec("linear", "mean", 3)).eval()
    ids = torch.randint(1, 60, (4, 7))
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    d = {n[len("backbone."):]: 0.1 * torch.randn(p.shape) for n, p in m.named_parameters() if "query.weight" in n}
    f0, j, h = jvp_batch(m, b, d, second_order=True)
    m.cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    f0c, jc, hc = jvp_batch(m, {k: v.cuda() for k, v in b.items()}, {k: v.cuda() for k, v in d.items()}, True)
    assert torch.allclose(f0, f0c.cpu(), atol=1e-5) and torch.allclose(j, jc.cpu(), atol=1e-5)
    assert torch.allclose(h, hc.cpu(), atol=1e-4)


def test_activation_schedule_saves_memory_on_cuda():
    """MiniLM-shaped random BERT, length 128: the activations schedule stores less than the Jacobian rows
    on the GPU too (no autograd graph kept alive by the stored layer inputs) and gives the same kernel."""
    from transformers import BertConfig, BertModel

    from taskvec.modeling import HeadSpec, LinearHead, TaskModel
    from taskvec.ntk import empirical_ntk

    torch.manual_seed(0)
    bb = BertModel(BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                              intermediate_size=1536, attn_implementation="eager"))
    m = TaskModel(bb, LinearHead(384, 2), HeadSpec("linear", "mean", 2)).float().cuda().eval()
    ids = torch.randint(1, 1000, (128, 128), device="cuda")
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(128, dtype=torch.long,
                                                                                        device="cuda")}
    peaks, res = {}, {}
    for sched in ("jacobian", "activations"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res[sched] = empirical_ntk(m, x, output="margin", kernel="trace", groups=False, chunk_size=16,
                                   schedule=sched)
        peaks[sched] = torch.cuda.max_memory_allocated() - base
    a = res["activations"].info
    assert a["schedule"] == "activations" and a["activation_bytes"] < 0.5 * a["full_jacobian_bytes"]
    assert peaks["activations"] < peaks["jacobian"], peaks
    K, Kj = res["activations"].kernel, res["jacobian"].kernel
    assert float((K - Kj).norm() / Kj.norm()) <= 1e-6
