"""linearize.jvp_many within a memory budget: chunked results equal the unchunked ones, the peak stays
under the budget (counted tensor bytes and the process's resident memory), and a budget too small for one
example along one direction is a one-line error."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from taskvec.errors import TaskvecError
from taskvec.linearize import jvp_batch, jvp_many, jvp_plan, parse_budget
from taskvec.modeling import HeadSpec, LinearHead, TaskModel
from taskvec.tensor_memory import LiveTensorBytes


def tiny_case(n: int, T: int, D: int):
    """A tiny random Llama classifier, ``n`` examples of ``T`` tokens (one left-padded), ``D`` directions on
    q_proj / v_proj (the third touches one tensor only)."""
    torch.manual_seed(0)
    bb = LlamaModel(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                attn_implementation="eager", pad_token_id=0))
    m = TaskModel(bb, LinearHead(32, 3), HeadSpec("linear", "last", 3)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (n, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :T // 2] = 0  # left padding on one example
    b = {"input_ids": ids, "attention_mask": mask}
    dirs = [{k[len("backbone."):]: torch.randn(p.shape, generator=g) for k, p in m.named_parameters()
             if k.endswith(("q_proj.weight", "v_proj.weight"))} for _ in range(D)]
    if D > 2:
        dirs[2] = dict(list(dirs[2].items())[:1])  # a direction touching one tensor only
    return m, b, dirs


def test_chunked_equals_unchunked_for_every_way_of_chunking():
    m, b, dirs = tiny_case(4, 16, 4)
    f0_ref, js_ref = jvp_many(m, b, dirs, max_memory=float("inf"))
    for d, j in zip(dirs, js_ref):  # the unchunked path itself equals one JVP per direction
        assert torch.allclose(j, jvp_batch(m, b, d)[1], rtol=1e-5, atol=1e-6)
    full = jvp_plan(m, b, dirs, max_memory=float("inf"))
    assert (full.examples, full.directions) == (4, 4)
    plan = jvp_plan(m, b, dirs, max_memory=1e12)
    per_chunk = plan.per_example + 4 * plan.per_example_direction
    shapes = set()
    for budget in (4 * plan.tangent_bytes + 2.5 * per_chunk,                            # examples split
                   2 * plan.tangent_bytes + plan.per_example + 2.5 * plan.per_example_direction,  # directions split
                   plan.tangent_bytes + plan.per_example + plan.per_example_direction):  # one by one
        p = jvp_plan(m, b, dirs, max_memory=budget)
        assert p.estimate <= budget
        shapes.add((p.examples, p.directions))
        f0, js = jvp_many(m, b, dirs, max_memory=budget)
        assert torch.allclose(f0, f0_ref, rtol=1e-5, atol=1e-6)
        assert all(torch.allclose(j, r, rtol=1e-5, atol=1e-6) for j, r in zip(js, js_ref))
    assert shapes == {(2, 4), (1, 2), (1, 1)}


def test_counted_peak_stays_under_the_budget_and_below_the_unbudgeted_peak():
    m, b, dirs = tiny_case(8, 48, 4)
    with LiveTensorBytes() as free:
        jvp_many(m, b, dirs, max_memory=float("inf"))
    budget = free.peak // 4
    jvp_plan(m, b, dirs, max_memory=budget)  # the probe, measured apart (it is cached)
    with LiveTensorBytes() as capped:
        jvp_many(m, b, dirs, max_memory=budget)
    assert capped.peak <= budget < free.peak
    assert capped.current == 0 and free.current == 0  # everything counted was released


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux peak-RSS reset")
def test_resident_memory_peak_with_a_budget_is_a_fraction_of_the_unbudgeted_one():
    """Independent of the tensor count: the process's peak resident memory (VmHWM, reset before the call)."""
    code = """
import sys
sys.path.insert(0, "tests")
from test_jvp_memory import tiny_case
from taskvec.linearize import jvp_many
m, b, dirs = tiny_case(8, 128, 4)
jvp_many(m, {k: v[:1, :8] for k, v in b.items()}, dirs[:1], max_memory=float("inf"))  # warm up kernels
budget = float(sys.argv[1])
if budget < float("inf"):
    from taskvec.linearize import jvp_plan
    jvp_plan(m, b, dirs, max_memory=budget)
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
jvp_many(m, b, dirs, max_memory=budget)
print(hwm() - base)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def grow(budget):
        r = subprocess.run([sys.executable, "-c", code, str(budget)], capture_output=True, text=True, env=env,
                           timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    free = grow(float("inf"))
    budget = 20e6
    capped = grow(budget)
    assert free > 5 * budget  # the unbudgeted call really needs more than the budget
    assert capped < 1.5 * budget + 8e6  # the budget, with allocator slack
    assert capped < free / 3


def test_a_budget_too_small_for_one_example_is_a_one_line_error():
    m, b, dirs = tiny_case(2, 16, 2)
    with pytest.raises(TaskvecError, match=r"one example of 16 tokens along one direction needs about .* lower "
                                           r"the sequence length") as e:
        jvp_many(m, b, dirs, max_memory=1000)
    assert "\n" not in str(e.value)
    with pytest.raises(TaskvecError, match="max_memory: expected a positive number of bytes"):
        parse_budget("lots")
    with pytest.raises(TaskvecError, match="max_memory"):
        parse_budget(0)
    assert parse_budget("2GB") == 2_000_000_000 and parse_budget("1MiB") == 2 ** 20


def test_default_budget_is_a_fraction_of_available_memory():
    m, b, dirs = tiny_case(2, 8, 2)
    avail = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable"))
    p = jvp_plan(m, b, dirs)
    assert 0.2 * avail < p.budget < 0.6 * avail


def test_validate_refuses_a_bad_budget_before_reading_the_run(tmp_path):
    from taskvec.validation import validate_run

    with pytest.raises(TaskvecError, match="max_memory: expected a positive number of bytes"):
        validate_run(tmp_path, max_memory="lots")


def test_one_probe_of_the_longest_batch_serves_the_shorter_ones():
    from taskvec.linearize import _PROBES, directional_outputs

    m, b, dirs = tiny_case(4, 24, 3)
    b["labels"] = torch.tensor([0, 1, 2, 0])
    short = {k: v[:, :10] if v.dim() == 2 else v for k, v in b.items()}
    named = {str(i): d for i, d in enumerate(dirs)}
    out = directional_outputs(m, [short, b], named, max_memory=1e12)
    probes = [lengths for lengths in _PROBES[m].values()]
    assert [sorted(p) for p in probes] == [[24]]  # probed once, at the longest length
    ref = jvp_many(m, short, dirs, max_memory=float("inf"))[1][0]
    assert torch.allclose(out.jvps["0"][:4], ref, rtol=1e-5, atol=1e-6)
