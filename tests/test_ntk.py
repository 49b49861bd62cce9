"""Empirical NTK: exact = NTK-vector-product reference = finite differences, on tiny random models."""

import math

import pytest
import torch

from taskvec.modeling import HeadSpec, LinearHead, TaskModel
from taskvec.ntk import (
    NTKError,
    Projector,
    empirical_ntk,
    jacobian_features,
    jvp_outputs,
    kernel_matrix,
    model_outputs,
    output_gradient,
    select_params,
)
from taskvec.scopes import ScopeError


def _bert(seed=0, num_labels=3, dtype=torch.float64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, attn_implementation="eager")
    m = TaskModel(BertModel(cfg), LinearHead(32, num_labels), HeadSpec("linear", "mean", num_labels))
    return m.to(dtype).eval()


def _decoder(arch, seed=0, num_labels=3, dtype=torch.float64):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=100, attn_implementation="eager")
    if arch == "llama":
        cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=64, **common)
        bb = T.LlamaModel(cfg)
    elif arch == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
                           **common)
        bb = T.GPT2Model(cfg)
    else:
        cfg = T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **common)
        bb = T.GPTNeoXModel(cfg)
    m = TaskModel(bb, LinearHead(32, num_labels), HeadSpec("linear", "last", num_labels))
    return m.to(dtype).eval()


def _inputs(n=5, L=7, seed=1, num_labels=3, token_types=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    for i in range(n):  # varied right padding
        k = L - (i % 3)
        mask[i, k:] = 0
        ids[i, k:] = 0
    b = {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % num_labels}
    if token_types:
        b["token_type_ids"] = (torch.arange(L)[None] >= 3).long().expand(n, L).clone()
    return b


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: threads only add overhead (and the test machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def bert():
    return _bert()


def test_exact_equals_reference_full_and_groups(bert):
    x = _inputs(n=4, token_types=True)
    ex = empirical_ntk(bert, x, mode="exact", kernel="full")
    ref = empirical_ntk(bert, x, mode="reference", kernel="full")
    assert ex.kernel.shape == (4, 4, 3, 3) and ex.kernel.dtype == torch.float64
    assert rel(ex.kernel, ref.kernel) <= 1e-6
    assert set(ex.groups) == {"0.q", "0.k", "0.v", "1.q", "1.k", "1.v"}
    for g in ex.groups:
        assert rel(ex.groups[g], ref.groups[g]) <= 1e-6, g
    # sum of group kernels = full kernel
    assert rel(sum(ex.groups.values()), ex.kernel) <= 1e-12
    assert ex.p == 6 * 32 * 32


def test_symmetric_psd_and_kinds(bert):
    x = _inputs(n=6)
    full = empirical_ntk(bert, x, kernel="full")
    M = kernel_matrix(full.kernel, "full")
    assert torch.equal(M, M.T)
    ev = torch.linalg.eigvalsh(M)
    assert ev.min() >= -1e-10 * ev.max()
    tr = empirical_ntk(bert, x, kernel="trace")
    dg = empirical_ntk(bert, x, kernel="diagonal")
    d = torch.diagonal(full.kernel, dim1=2, dim2=3)
    assert tr.kernel.shape == (6, 6) and dg.kernel.shape == (6, 6, 3)
    assert rel(dg.kernel, d) <= 1e-12
    assert rel(tr.kernel, d.mean(-1)) <= 1e-12  # average over outputs, not the sum


def test_finite_differences_and_first_order(bert):
    """K[i, j, a, b] = <∇f_a(x_i), ∇f_b(x_j)>: check by central differences along g = ∇f_b(x_j)."""
    x = _inputs(n=4)
    ex = empirical_ntk(bert, x, kernel="full")
    sels = select_params(bert, "qkv")
    named = dict(bert.named_parameters())
    for j, b in [(0, 0), (2, 1), (3, 2)]:
        grads = output_gradient(bert, x, j, b, sels)
        g = {}
        for d in grads.values():
            g.update(d)
        eps = 1e-5

        def f_at(scale):
            with torch.no_grad():
                for n, v in g.items():
                    named[n].add_(scale * v)
                out = model_outputs(bert, x)
                for n, v in g.items():
                    named[n].sub_(scale * v)
            return out

        fd = (f_at(eps) - f_at(-eps)) / (2 * eps)
        assert rel(fd, ex.kernel[:, j, :, b]) <= 1e-6
        # first-order check: f(θ + εg) − f(θ) ≈ ε K, error O(ε²)
        e1 = 1e-4
        lin = (f_at(e1) - f_at(0.0)) / e1
        assert rel(lin, ex.kernel[:, j, :, b]) <= 1e-2
        # JVP helper gives J·g directly
        f0, jv = jvp_outputs(bert, x, g)
        assert rel(jv, ex.kernel[:, j, :, b]) <= 1e-10
        assert rel(f0, f_at(0.0)) <= 1e-12


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
@pytest.mark.parametrize("scope", ["qkv", "k"])
def test_decoders_and_fused_qkv(arch, scope):
    m = _decoder(arch)
    x = _inputs(n=3, L=6)
    ex = empirical_ntk(m, x, params=scope, kernel="full")
    ref = empirical_ntk(m, x, params=scope, mode="reference", kernel="full", groups=False)
    assert rel(ex.kernel, ref.kernel) <= 1e-6
    assert rel(sum(ex.groups.values()), ex.kernel) <= 1e-12


@pytest.mark.parametrize("output", ["margin", "loss"])
def test_scalar_outputs(bert, output):
    x = _inputs(n=4)
    ex = empirical_ntk(bert, x, output=output, kernel="trace")
    ref = empirical_ntk(bert, x, output=output, mode="reference", kernel="trace")
    assert ex.kernel.shape == (4, 4) and ex.o1 == 1
    assert rel(ex.kernel, ref.kernel) <= 1e-6


def test_row_blocks_with_recomputation_match(bert):
    x = _inputs(n=7)
    one = empirical_ntk(bert, x, kernel="full", chunk_size=2)
    p = one.p
    budget = 2 * 3 * p * 8 + 2 * 3 * p * 8 + 2 * 2 * 3 * 3 * 1024 * 8 + 3 * 3 * p * 8  # ~3 stored rows
    blk = empirical_ntk(bert, x, kernel="full", chunk_size=2, max_memory=budget, schedule="jacobian")
    assert blk.info["row_block"] < 7 and blk.info["gradient_passes"] > 7
    assert rel(blk.kernel, one.kernel) <= 1e-12
    for g in one.groups:
        assert rel(blk.groups[g], one.groups[g]) <= 1e-12


def test_cross_kernel_is_block_of_joint_kernel(bert):
    a, b = _inputs(n=3, seed=1), _inputs(n=4, seed=2)
    from taskvec.ntk import as_batch

    joint = empirical_ntk(bert, as_batch([a, b]), kernel="full").kernel
    cross = empirical_ntk(bert, a, b, kernel="full").kernel
    assert cross.shape == (3, 4, 3, 3)
    assert rel(cross, joint[:3, 3:]) <= 1e-10


def test_cross_task_with_other_head():
    m1 = _bert(num_labels=3)
    m2 = _bert(num_labels=2)
    m2.backbone.load_state_dict(m1.backbone.state_dict())
    a, b = _inputs(n=3, seed=1), _inputs(n=3, seed=2, num_labels=2)
    ex = empirical_ntk(m1, a, b, model2=m2, kernel="full")
    ref = empirical_ntk(m1, a, b, model2=m2, mode="reference", kernel="full")
    assert ex.kernel.shape == (3, 3, 3, 2)
    assert rel(ex.kernel, ref.kernel) <= 1e-6
    with pytest.raises(NTKError, match="same number of outputs"):
        empirical_ntk(m1, a, b, model2=m2, kernel="trace")
    m3 = _bert(seed=5, num_labels=2)
    with pytest.raises(NTKError, match="differs between the two models"):
        empirical_ntk(m1, a, b, model2=m3)


def test_sketch_unbiased_and_error_rate(bert):
    x = _inputs(n=6)
    sels = select_params(bert, "qkv")
    F = jacobian_features(bert, x, mode="exact")
    K = F.kernel(kind="trace")
    J = {g: F.group(g) for g in F.groups}
    errs = {}
    for k in (32, 128, 512):
        est = []
        for s in range(24):
            phi, _ = Projector(sels, k, seed=s).project(J)
            est.append((phi.reshape(6, -1) @ phi.reshape(6, -1).T) / 3)
        errs[k] = sum(rel(e, K) for e in est) / len(est)
        if k == 32:
            mean_err = rel(sum(est) / len(est), K)
            assert mean_err <= 2.5 * errs[k] / math.sqrt(len(est))  # unbiased: error of the mean ~ 1/√S
    for a, b in [(32, 128), (128, 512)]:
        assert 1.5 <= errs[a] / errs[b] <= 2.7, errs  # ~ 1/√k: ratio 2 for a 4× larger k


def test_sketch_mode_deterministic_and_shared_across_tasks(bert):
    a, b = _inputs(n=3, seed=1), _inputs(n=4, seed=2)
    fa = jacobian_features(bert, a, mode="sketch", sketch_dim=64, seed=7, chunk_size=2)
    fb = jacobian_features(bert, b, mode="sketch", sketch_dim=64, seed=7, chunk_size=3)
    from taskvec.ntk import as_batch

    fab = jacobian_features(bert, as_batch([a, b]), mode="sketch", sketch_dim=64, seed=7, chunk_size=4)
    assert torch.allclose(fab.features[:3], fa.features, rtol=1e-5, atol=1e-7)
    assert torch.allclose(fab.features[3:], fb.features, rtol=1e-5, atol=1e-7)
    res = empirical_ntk(bert, a, b, mode="sketch", sketch_dim=64, seed=7, kernel="full")
    assert torch.allclose(res.kernel, fa.kernel(fb, "full"), rtol=1e-4, atol=1e-8)
    # group features sum to the full features (group kernels sum to K only in expectation)
    fg = jacobian_features(bert, a, mode="sketch", sketch_dim=64, seed=7, per_group=True)
    assert rel(sum(fg.groups.values()), fg.features) <= 1e-5


def test_lora_params():
    peft = pytest.importorskip("peft")
    m = _bert()
    m.backbone = peft.get_peft_model(m.backbone, peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                 init_lora_weights=False))
    m = m.double().eval()
    x = _inputs(n=3)
    ex = empirical_ntk(m, x, params="lora", output="margin", kernel="trace")
    ref = empirical_ntk(m, x, params="lora", output="margin", mode="reference", kernel="trace")
    assert rel(ex.kernel, ref.kernel) <= 1e-6
    assert ex.p == 2 * 2 * (2 * 32 + 32 * 2)


def test_bad_inputs(bert):
    x = _inputs(n=3)
    with pytest.raises(ScopeError, match="names look like"):
        empirical_ntk(bert, x, params="re:no_such_param")
    with pytest.raises(NTKError, match=r"needs .*B.*sketch"):
        empirical_ntk(bert, x, max_memory=1000)
    with pytest.raises(NTKError, match="labels"):
        empirical_ntk(bert, {k: v for k, v in x.items() if k != "labels"}, output="margin")
    with pytest.raises(NTKError, match="unknown mode"):
        empirical_ntk(bert, x, mode="fast")
    m = _bert()
    with torch.no_grad():
        m.backbone.embeddings.word_embeddings.weight[int(x["input_ids"][1, 0])] = float("nan")
    with pytest.raises(NTKError, match="example 1 "):
        empirical_ntk(m, x)


def test_result_save_load(tmp_path, bert):
    res = empirical_ntk(bert, _inputs(n=3), kernel="trace")
    res.save(tmp_path / "k.safetensors")
    back = type(res).load(tmp_path / "k.safetensors")
    assert torch.equal(back.kernel, res.kernel) and set(back.groups) == set(res.groups)
    assert back.meta()["n1"] == 3


@pytest.mark.gpu
def test_cuda_exact_matches_cpu_float64():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    m64 = _bert()
    m32 = _bert().float().cuda()
    x = _inputs(n=6)
    ref = empirical_ntk(m64, x, kernel="full").kernel
    got = empirical_ntk(m32, x, kernel="full")
    assert got.kernel.dtype == torch.float64 and got.kernel.device.type == "cpu"
    assert rel(got.kernel, ref) <= 1e-5
    # budget = one chunk's gradients and their copy (2·2·o·p·4 B) + 3 stored rows (3·o·p·4 B): row blocks of 3
    blk = empirical_ntk(m32, x, kernel="full", chunk_size=2, max_memory=(12 + 9) * got.p * 4 + 1,
                        schedule="jacobian")
    assert blk.info["row_block"] == 3 and blk.info["gradient_passes"] > 6
    # fp32 gradients: another chunk size runs other CUDA kernels (round-off ~1e-8), so not bitwise
    assert rel(blk.kernel, got.kernel) <= 1e-6
    for sched in ("activations", "jacobian"):
        other = empirical_ntk(m32, x, kernel="full", schedule=sched)
        assert other.info["schedule"] == sched and rel(other.kernel, ref) <= 1e-5
        assert rel(sum(other.groups.values()), other.kernel) <= 1e-12
    sk = empirical_ntk(m32, x, mode="sketch", sketch_dim=4096, kernel="trace")
    assert rel(sk.kernel, convert(ref)) <= 0.2


def convert(full):
    return torch.diagonal(full, dim1=2, dim2=3).mean(-1)


# --- speed paths: batched per-example gradients, float32 Gram products (issue 4) ---------------------------


def _gpt2_lora():
    peft = pytest.importorskip("peft")
    m = _bert()
    m.backbone = peft.get_peft_model(m.backbone, peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                 init_lora_weights=False))
    return m.double().eval(), "lora"


@pytest.mark.parametrize("case", ["bert", "gpt2", "llama", "lora"])
def test_batched_engine_equals_vmap_engine(case):
    """One batched forward/backward with per-example weight gradients = vmap(jacrev), row by row."""
    from taskvec.ntk import _Jacobian, as_batch

    if case == "lora":
        m, scope = _gpt2_lora()
    else:
        m, scope = (_bert() if case == "bert" else _decoder(case)), "qkv"
    sels = select_params(m, scope)
    x = as_batch(_inputs(n=5, token_types=case == "bert"))
    fast = _Jacobian(m, sels, "logits", 5)
    slow = _Jacobian(m, sels, "logits", 5, engine="vmap")
    idx = torch.arange(5)
    with torch.no_grad():
        a, b = fast.chunk(x, idx), slow.chunk(x, idx)
    assert fast.engine == "batched" and fast.fallback_reason is None
    for g in b:
        assert a[g].shape == b[g].shape == (5, 3, fast.group_sizes[g])
        assert rel(a[g], b[g]) <= 1e-12, g


def test_batched_engine_falls_back_when_a_layer_is_not_a_plain_linear_map():
    """A selected weight used other than as ``x Wᵀ`` (here: doubled) fails the first-chunk check."""
    m = _bert()
    q = m.backbone.encoder.layer[0].attention.self.query
    q.forward = lambda inp: torch.nn.functional.linear(inp, 2 * q.weight, q.bias)
    x = _inputs(n=4)
    ex = empirical_ntk(m, x, kernel="full")
    ref = empirical_ntk(m, x, kernel="full", mode="reference", groups=False)
    assert ex.info["engine"] == "vmap"
    assert rel(ex.kernel, ref.kernel) <= 1e-6
    from taskvec.ntk import _Jacobian, as_batch

    jf = _Jacobian(m, select_params(m, "qkv"), "logits", 4)
    with torch.no_grad():
        jf.chunk(as_batch(x), torch.arange(4))
    assert jf.engine == "vmap" and "layer.0.attention.self.query.weight" in jf.fallback_reason


@pytest.mark.parametrize("kind", ["full", "trace", "diagonal"])
def test_float32_products_match_float64_gram(monkeypatch, kind):
    """float32 models: Gram products in float32 over column blocks, added in float64, agree with a float64
    Gram of the same float32 Jacobian to ~1e-7 (and are not that computation in disguise)."""
    import taskvec.ntk.gram as N

    monkeypatch.setattr(N, "_P_BLOCK", 300)  # groups of 1,024 columns: blocks of 300, 300, 300, 124
    m32 = _bert(dtype=torch.float32)
    x = _inputs(n=6)
    F = jacobian_features(m32, x, mode="exact")  # float64 copy of the float32 Jacobian rows
    assert F.features.dtype == torch.float64
    ex = empirical_ntk(m32, x, kernel=kind)
    ref = F.kernel(kind=kind)
    err = rel(ex.kernel, ref)
    assert 1e-13 < err <= 1e-6, err
    for g in ex.groups:
        Fg = F.group(g)
        assert rel(ex.groups[g], N._gram_tile(Fg, Fg, kind)) <= 1e-6, g
    assert rel(sum(ex.groups.values()), ex.kernel) <= 1e-12
    # the symmetric kernel is still exactly symmetric (upper-triangle tiles mirrored)
    M = ex.matrix()
    assert torch.equal(M, M.T)


def test_symmetric_triangle_tiles(monkeypatch):
    """Diagonal blocks computed as tiles i ≤ j (3-row tiles here) equal one product, groups included."""
    import taskvec.ntk.gram as N

    x = _inputs(n=7)
    one = empirical_ntk(_bert(), x, kernel="full")
    monkeypatch.setattr(N, "_sym_tile", lambda device: 3)
    tiled = empirical_ntk(_bert(), x, kernel="full")
    assert rel(tiled.kernel, one.kernel) <= 1e-13
    for g in one.groups:
        assert rel(tiled.groups[g], one.groups[g]) <= 1e-13
    M = tiled.matrix()
    assert torch.equal(M, M.T)


# --- schedules: stored activations (one pass, group by group) vs stored Jacobian rows ----------------------------


def _model(case):
    if case == "lora":
        return _gpt2_lora()
    return (_bert() if case == "bert" else _decoder(case)), "qkv"


@pytest.mark.parametrize("case", ["bert", "gpt2", "llama", "lora"])
@pytest.mark.parametrize("kind", ["full", "trace", "diagonal"])
def test_activation_schedule_equals_jacobian_schedule(case, kind):
    """Both exact schedules give the same kernel and group kernels (symmetric and cross, fused GPT-2 QKV sliced,
    GQA, LoRA factors), and the Jacobian schedule equals the NTK-vector-product reference."""
    m, scope = _model(case)
    x, y = _inputs(n=6, token_types=case == "bert"), _inputs(n=4, seed=5, token_types=case == "bert")
    act = empirical_ntk(m, x, params=scope, kernel=kind, schedule="activations")
    jac = empirical_ntk(m, x, params=scope, kernel=kind, schedule="jacobian")
    assert act.info["schedule"] == "activations" and jac.info["schedule"] == "jacobian"
    assert act.info["gradient_passes"] == 6
    assert rel(act.kernel, jac.kernel) <= 1e-12
    assert set(act.groups) == set(jac.groups)
    for g in jac.groups:
        assert rel(act.groups[g], jac.groups[g]) <= 1e-12, g
    M = act.matrix()
    assert torch.equal(M, M.T)
    cross_a = empirical_ntk(m, x, y, params=scope, kernel=kind, schedule="activations")
    cross_j = empirical_ntk(m, x, y, params=scope, kernel=kind, schedule="jacobian")
    assert cross_a.info["gradient_passes"] == 10
    assert rel(cross_a.kernel, cross_j.kernel) <= 1e-12
    if kind == "full" and case in ("bert", "gpt2"):
        ref = empirical_ntk(m, x, y, params=scope, kernel=kind, mode="reference", groups=False)
        assert rel(cross_j.kernel, ref.kernel) <= 1e-6


def test_activation_schedule_row_blocks_and_auto_choice():
    """A budget below the whole Jacobian: ``auto`` keeps activations (one pass, no recomputation) and splits
    the group Grams into row blocks; the result equals the unconstrained kernel."""
    m = _bert()
    x = _inputs(n=9, L=5)
    one = empirical_ntk(m, x, kernel="full", chunk_size=2, schedule="jacobian")
    full_bytes = one.info["full_jacobian_bytes"]
    auto = empirical_ntk(m, x, kernel="full", chunk_size=2)
    assert auto.info["schedule"] == "activations"  # short sequences: activations are the smaller store
    assert auto.info["activation_bytes"] < full_bytes
    # room for the activations, the kernels and two row blocks of 2-3 examples, not for 9 rows
    per_row = 3 * max(one.group_sizes.values()) * 8
    kern = 9 * 9 * 3 * 3 * 8 * 2
    budget = auto.info["activation_bytes"] + kern + 5 * per_row
    blk = empirical_ntk(m, x, kernel="full", chunk_size=2, max_memory=budget)
    assert blk.info["schedule"] == "activations" and blk.info["row_block"] < 9
    assert blk.info["gradient_passes"] == 9
    assert rel(blk.kernel, one.kernel) <= 1e-12
    for g in one.groups:
        assert rel(blk.groups[g], one.groups[g]) <= 1e-12, g
    y = _inputs(n=5, seed=3)
    ref = empirical_ntk(m, x, y, kernel="trace", chunk_size=2, schedule="jacobian")
    free = empirical_ntk(m, x, y, kernel="trace", chunk_size=2)
    budget = free.info["activation_bytes"] + 9 * 5 * 8 * 2 + 5 * per_row
    cross = empirical_ntk(m, x, y, kernel="trace", chunk_size=2, max_memory=budget)
    assert cross.info["schedule"] == "activations" and cross.info["row_block"] < 9
    assert rel(cross.kernel, ref.kernel) <= 1e-12
    # too small even for the activations: auto falls back to Jacobian row blocks, a forced schedule says why
    tiny = auto.info["activation_bytes"] // 2
    with pytest.raises(NTKError, match="schedule='activations' does not fit"):
        empirical_ntk(m, x, kernel="full", chunk_size=2, max_memory=tiny, schedule="activations")
    with pytest.raises(NTKError, match="unknown schedule"):
        empirical_ntk(m, x, schedule="fast")


def test_activation_schedule_needs_the_batched_engine():
    m = _bert()
    q = m.backbone.encoder.layer[0].attention.self.query
    q.forward = lambda inp: torch.nn.functional.linear(inp, 2 * q.weight, q.bias)
    with pytest.raises(NTKError, match="needs the batched engine"):
        empirical_ntk(m, _inputs(n=4), schedule="activations")
    assert empirical_ntk(m, _inputs(n=4)).info["schedule"] == "jacobian"


def test_activation_schedule_names_a_non_finite_example():
    m = _bert()
    x = _inputs(n=5)
    with torch.no_grad():
        m.backbone.embeddings.word_embeddings.weight[x["input_ids"][3, 0]] = float("nan")
    with pytest.raises(NTKError, match="example 3 of inputs1"):
        empirical_ntk(m, x, schedule="activations")


# --- distributed (torch.distributed, gloo on the CPU) ----------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6])
def test_distributed_tile_assignment_covers_each_pair_once(world):
    """Simulate the symmetric schedule entry by entry: every unordered pair of examples exactly once."""
    from taskvec.ntk import _computes

    for sizes_from, chunk in ((7, 2), (13, 3), (world, 1), (20, 4)):
        shards = [list(range(sizes_from))[r::world] for r in range(world)]
        count: dict = {}

        def mark(i, j, count=count):
            key = (min(i, j), max(i, j))
            count[key] = count.get(key, 0) + 1

        for r in range(world):
            mine = shards[r]
            for a in range(len(mine)):  # diagonal block (upper triangle of the owner's rows)
                for b in range(a, len(mine)):
                    mark(mine[a], mine[b])
            odd = [mine[i] for a in range(chunk, len(mine), 2 * chunk) for i in range(a, min(a + chunk, len(mine)))]
            for s in range(world):
                for k, a in enumerate(range(0, len(shards[s]), chunk)):
                    how = _computes(r, s, k, world)
                    rows = {"all": mine, "odd": odd, None: []}[how]
                    for i in rows:
                        for j in shards[s][a:a + chunk]:
                            mark(i, j)
        n = sizes_from
        assert count == {(i, j): 1 for i in range(n) for j in range(i, n)}, (world, n, chunk)


def test_distributed_needs_a_process_group(bert):
    with pytest.raises(NTKError, match="init_process_group"):
        empirical_ntk(bert, _inputs(n=3), distributed=True)


_WORKER = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_ntk import _bert, _inputs
from taskvec.ntk import empirical_ntk, jacobian_features
torch.set_num_threads(1)
dist.init_process_group("gloo")
m = _bert()
x, y = _inputs(n=7, seed=1), _inputs(n=5, seed=2)
out = {{}}
ex = empirical_ntk(m, x, kernel="full", chunk_size=2)   # 2 ranks: shards of 4 and 3, chunks of 2
out["exact"] = ex.kernel
out.update({{"exact/" + g: v for g, v in ex.groups.items()}})
out["info_world"] = torch.tensor(ex.info["world_size"])
out["exact_trace"] = empirical_ntk(m, x, kernel="trace", groups=False, chunk_size=3).kernel
out["cross"] = empirical_ntk(m, x, y, kernel="full", chunk_size=2).kernel
out["sketch"] = empirical_ntk(m, x, mode="sketch", sketch_dim=64, seed=3, kernel="trace").kernel
f = jacobian_features(m, x, mode="sketch", sketch_dim=64, seed=3, per_group=True, chunk_size=2)
out["features"] = f.features
out["features/0.q"] = f.groups["0.q"]
single = empirical_ntk(m, x, kernel="trace", groups=False, distributed=False)
out["local"] = single.kernel
out["local_world"] = torch.tensor(single.info.get("world_size", 1))
torch.save(out, {path!r} + f".{{dist.get_rank()}}")
dist.destroy_process_group()
'''


def test_distributed_two_ranks_equal_single_process(tmp_path, bert):
    """torchrun, 2 CPU ranks (gloo), tiny BERT: every rank returns the single-process kernels and features."""
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                     path=str(tmp_path / "out.pt")))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, check=False,
                          timeout=1200)  # generous: a shared, loaded machine; a hang still fails
    assert proc.returncode == 0, proc.stderr[-3000:]
    x, y = _inputs(n=7, seed=1), _inputs(n=5, seed=2)
    ex = empirical_ntk(bert, x, kernel="full")
    want = {"exact": ex.kernel, "exact_trace": empirical_ntk(bert, x, kernel="trace", groups=False).kernel,
            "cross": empirical_ntk(bert, x, y, kernel="full").kernel,
            "sketch": empirical_ntk(bert, x, mode="sketch", sketch_dim=64, seed=3, kernel="trace").kernel}
    want.update({"exact/" + g: v for g, v in ex.groups.items()})
    f = jacobian_features(bert, x, mode="sketch", sketch_dim=64, seed=3, per_group=True)
    want["features"], want["features/0.q"] = f.features, f.groups["0.q"]
    for r in (0, 1):
        got = torch.load(tmp_path / f"out.pt.{r}")
        assert int(got["info_world"]) == 2 and int(got["local_world"]) == 1
        for k, v in want.items():
            tol = 1e-5 if k.startswith("features") else 1e-10  # float32 features
            assert got[k].shape == v.shape and rel(got[k], v) <= tol, (r, k, rel(got[k], v))
        assert rel(got["local"], want["exact_trace"]) <= 1e-10
        M = kernel_matrix(got["exact"], "full")
        assert torch.equal(M, M.T)


def test_result_repr_summarises_without_tensors(bert):
    res = empirical_ntk(bert, _inputs(n=3), kernel="trace")
    r = repr(res)
    assert r.startswith("NTKResult(") and "trace (3, 3)" in r and "mode=exact" in r
    assert f"engine={res.info['engine']}" in r and f"schedule={res.info['schedule']}" in r and "tensor" not in r
    assert "<table>" in res._repr_html_() and "trace (3, 3)" in res._repr_html_()
