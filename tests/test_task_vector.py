import math

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from taskvec.errors import BaseMismatchError, ShapeMismatchError, TaskvecError
from taskvec.modeling import HeadSpec, LinearHead, TaskModel, load_backbone
from taskvec.task_vector import TaskVector


def perturbed(path, seed=1, scale=0.01, only=None):
    m = load_backbone(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if only is None or only in n:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def test_base_plus_tau_reproduces_finetuned_exactly(tiny_bert):
    ft = perturbed(tiny_bert)
    tv = TaskVector.from_models(tiny_bert, ft, scope="full", task="t")
    rebuilt = tv.apply_to(load_backbone(tiny_bert))
    for (n, a), (_, b) in zip(rebuilt.named_parameters(), ft.named_parameters()):
        # float32 add of the float32 difference: exact up to one rounding of the sum
        assert torch.allclose(a, b, rtol=0, atol=1e-7), n
    # from directories too (the fine-tuned one saved with save_pretrained)
    ft.save_pretrained(tiny_bert.parent / "ft_dir")
    tv2 = TaskVector.from_models(tiny_bert, tiny_bert.parent / "ft_dir", scope="full")
    assert tv2.base_fingerprint == tv.base_fingerprint
    assert all(torch.equal(tv.deltas[k], tv2.deltas[k]) for k in tv.deltas)


def test_scope_restriction_and_heads(tiny_bert):
    base = load_backbone(tiny_bert)
    ft = TaskModel(perturbed(tiny_bert), LinearHead(32, 3), HeadSpec("linear", "mean", 3))
    tv = TaskVector.from_models(base, ft, scope="qkv")
    assert len(tv.deltas) == 6 and all("attention.self" in k for k in tv.deltas)
    assert set(tv.heads) == {"linear.weight", "linear.bias"}


def test_arithmetic_identities(tiny_bert):
    a = TaskVector.from_models(tiny_bert, perturbed(tiny_bert, 1), scope="qkv", task="a")
    b = TaskVector.from_models(tiny_bert, perturbed(tiny_bert, 2), scope="qkv", task="b")
    s = a + b
    assert math.isclose(s.norm() ** 2, a.norm() ** 2 + b.norm() ** 2 + 2 * a.dot(b), rel_tol=1e-9)
    assert (a - a).norm() == 0
    assert math.isclose((2 * a).norm(), 2 * a.norm(), rel_tol=1e-12)
    assert math.isclose((a / 4).norm(), a.norm() / 4, rel_tol=1e-12)
    assert math.isclose((-a).cosine(a), -1.0, rel_tol=1e-9)
    assert math.isclose(a.cosine(a), 1.0, rel_tol=1e-9)
    assert sum([a, b]).norm() == s.norm()
    m = TaskVector.cosine_matrix([a, b, a])
    assert m.shape == (3, 3) and math.isclose(m[0, 2], 1.0, rel_tol=1e-9) and m[0, 1] == m[1, 0]
    assert abs(a.cosine(b)) < 0.2  # independent random perturbations are nearly orthogonal
    assert math.isclose(a.norm(1), sum(float(v.abs().sum()) for v in a.deltas.values()), rel_tol=1e-6)


def test_save_load_roundtrip_and_metadata(tmp_path, tiny_bert):
    ft = TaskModel(perturbed(tiny_bert), LinearHead(32, 2), HeadSpec("linear", "mean", 2))
    tv = TaskVector.from_models(tiny_bert, ft, scope="qv", task="sst")
    p = tv.save(tmp_path / "v.safetensors")
    back = TaskVector.load(p)
    assert back.task == "sst" and back.scope == "qv" and back.base_fingerprint == tv.base_fingerprint
    assert all(torch.equal(back.deltas[k], tv.deltas[k]) for k in tv.deltas)
    assert set(back.heads) == set(tv.heads)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TaskvecError, match="not a taskvec task vector"):
        TaskVector.load(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff\x00garbage")
    with pytest.raises(TaskvecError, match="cannot read"):
        TaskVector.load(tmp_path / "bad.safetensors")


def test_wrong_base_and_shape_errors(tiny_dirs, tiny_bert):
    tv = TaskVector.from_models(tiny_bert, perturbed(tiny_bert), scope="qkv")
    other = perturbed(tiny_bert, seed=5, scale=1.0)  # a different "base"
    with pytest.raises(BaseMismatchError, match="extracted from base"):
        tv.apply_to(other)
    tv.apply_to(other, check_base=False)  # explicit opt-out works
    other_tv = TaskVector.from_models(other, perturbed(tiny_bert, 7), scope="qkv")
    with pytest.raises(BaseMismatchError):
        tv + other_tv
    big = GPT2Model(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(TaskvecError, match="not a parameter"):
        tv.apply_to(big, check_base=False)
    bad = TaskVector({"encoder.layer.0.attention.self.query.weight": torch.zeros(3, 3)})
    with pytest.raises(ShapeMismatchError, match=r"\(3, 3\) vs model shape \(32, 32\)"):
        bad.apply_to(load_backbone(tiny_bert))
    # a fine-tuned model with a differently shaped tensor
    from transformers import BertConfig, BertModel
    wide = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=96, max_position_embeddings=128))
    with pytest.raises(ShapeMismatchError, match=r"intermediate.dense.*base shape \(64,?.*vs fine-tuned shape \(96"):
        TaskVector.from_models(tiny_bert, wide, scope="full")


def test_gpt2_fused_slices_from_models(tiny_dirs):
    base = load_backbone(tiny_dirs["gpt2"])
    ft = perturbed(tiny_dirs["gpt2"], only="c_attn")
    tv = TaskVector.from_models(base, ft, scope="qv")
    d = tv.deltas["h.0.attn.c_attn.weight"]
    assert d[:, 32:64].abs().sum() == 0 and d[:, :32].abs().sum() > 0 and d[:, 64:].abs().sum() > 0


@pytest.mark.parametrize("kind,targets,rslora", [("bert", ["query", "value"], False),
                                                 ("bert", ["query", "key"], True),
                                                 ("gpt2", ["c_attn"], False),
                                                 ("llama", ["q_proj", "v_proj"], True)])
def test_lora_delta_equals_merge_and_unload(tiny_dirs, kind, targets, rslora, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_backbone(tiny_dirs[kind])
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora,
                     fan_in_fan_out=(kind == "gpt2"), init_lora_weights=False)
    pm = get_peft_model(base, cfg)
    tv = TaskVector.from_peft(pm, task="lora")
    pm.save_pretrained(tmp_path / "adapter")
    tv_dir = TaskVector.from_peft(tmp_path / "adapter")
    merged = pm.merge_and_unload().state_dict()
    changed = {k for k in ref if not torch.equal(ref[k], merged[k])}
    assert changed == set(tv.deltas)
    for k in changed:
        assert torch.allclose(tv.deltas[k], merged[k] - ref[k], atol=1e-6), k
        assert torch.allclose(tv_dir.deltas[k], tv.deltas[k], atol=1e-7), k
    assert tv.base_fingerprint == TaskVector.from_models(tiny_dirs[kind], tiny_dirs[kind], scope="qkv").base_fingerprint
