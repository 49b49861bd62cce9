"""LoRA merges through ΔW = scaling·B·A: equal to merging the merged-and-unloaded models."""

import json

import pytest
import torch
from safetensors.torch import load_file

from taskvec.merge import MergeError, factorize, lora_delta, merge

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def _adapter(path, seed, **lora_kw):
    """A peft adapter with random (non-zero) A and B; returns the merged-and-unloaded state dict."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(), LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = _base()
    base.save_pretrained(root / "base")
    merged = [
        _adapter(root / "a0", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        _adapter(root / "a1", 2, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"],
                 rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 5}),
    ]
    from transformers import LlamaConfig, LlamaForCausalLM

    for i, state in enumerate(merged):  # the merged-and-unloaded models, as model directories
        m = LlamaForCausalLM(LlamaConfig(**LLAMA))
        m.load_state_dict(state)
        m.save_pretrained(root / f"m{i}")
    return root, {k: v.detach().clone() for k, v in base.state_dict().items()}, merged


def test_lora_delta_equals_peft_merge_and_unload(lora_setup):
    from taskvec.merge import LoraAdapter
    from taskvec.merge.engine import Checkpoint

    root, base, merged = lora_setup
    for i in range(2):
        ad = LoraAdapter(root / f"a{i}", Checkpoint)
        assert ad.targets
        for name in ad.targets:
            torch.testing.assert_close(base[name] + ad.delta(name), merged[i][name], rtol=0, atol=2e-7)
    # rsLoRA + rank/alpha patterns: scaling alpha/sqrt(r) with the module's own r and alpha
    ad = LoraAdapter(root / "a1", Checkpoint)
    assert ad.targets["model.layers.0.mlp.down_proj.weight"].scaling == pytest.approx(5 / 3 ** 0.5)
    assert ad.targets["model.layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(4 / 2 ** 0.5)


def test_fan_in_fan_out_gpt2(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2Model

    from taskvec.merge import LoraAdapter
    from taskvec.merge.engine import Checkpoint

    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "ad")
    merged = model.merge_and_unload().state_dict()
    ad = LoraAdapter(tmp_path / "ad", Checkpoint)
    for name in ad.targets:
        assert ad.delta(name).shape == (32, 96)
        torch.testing.assert_close(base_state[name] + ad.delta(name), merged[name], rtol=0, atol=2e-7)


def _state(out):
    d = {}
    for f in out.glob("model-*.safetensors"):
        d.update(load_file(str(f)))
    return d


@pytest.mark.parametrize("method,mparams", [("task_arithmetic", [{"weight": 0.5}, {"weight": 0.7}]),
                                            ("ties", [{"density": 0.5}, {"density": 0.7}])])
def test_adapter_merge_equals_merging_unloaded_models(lora_setup, tmp_path, method, mparams):
    root, base, merged = lora_setup

    def cfg(prefix):
        return {"method": method, "base_model": str(root / "base"),
                "models": [{"model": str(root / f"{prefix}{i}"), "parameters": mparams[i]} for i in range(2)]}

    merge(cfg("a"), tmp_path / "from_adapters", show_progress=False)
    merge(cfg("m"), tmp_path / "from_models", show_progress=False)
    a, m = _state(tmp_path / "from_adapters"), _state(tmp_path / "from_models")
    assert a.keys() == m.keys()
    for k in a:
        torch.testing.assert_close(a[k], m[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_refactorised_adapter_loads_in_peft_and_matches(lora_setup, tmp_path):
    from peft import PeftModel

    root, base, merged = lora_setup
    cfg = {"method": "task_arithmetic", "base_model": str(root / "base"), "lora_rank": 7,
           "models": [{"model": str(root / "a0"), "parameters": {"weight": 0.5}},
                      {"model": str(root / "a1"), "parameters": {"weight": 0.7}}]}
    merge(cfg, tmp_path / "ad", show_progress=False)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 7
    model = PeftModel.from_pretrained(_base(), tmp_path / "ad").merge_and_unload()
    got = model.state_dict()
    for k, b in base.items():  # rank 7 ≥ 4 + 3: exact up to rounding
        expect = b + 0.5 * (merged[0][k] - b) + 0.7 * (merged[1][k] - b)
        torch.testing.assert_close(got[k], expect, rtol=0, atol=1e-5, msg=k)


def test_factorize_is_best_rank_r():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 12, generator=g)
    S = torch.linalg.svdvals(M)
    for r in (1, 4, 12):
        A, B = factorize(M, r)
        assert A.shape == (r, 12) and B.shape == (20, r)
        err = torch.linalg.matrix_norm(M - B @ A)
        torch.testing.assert_close(err, S[r:].square().sum().sqrt(), rtol=1e-4, atol=1e-4)
    A0, B0 = torch.randn(3, 12, generator=g), torch.randn(20, 3, generator=g)
    A, B = factorize(lora_delta(A0, B0, 2.0), 3)
    torch.testing.assert_close(B @ A, 2.0 * B0 @ A0, rtol=1e-4, atol=1e-4)


def test_lora_errors(lora_setup, tmp_path):
    root, *_ = lora_setup
    cfg = json.loads((root / "a0" / "adapter_config.json").read_text())
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((root / "a0" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(MergeError, match="DoRA"):
        merge({"method": "ties", "base_model": str(root / "base"), "models": [str(bad)]}, tmp_path / "o",
              show_progress=False)
    with pytest.raises(MergeError, match="lora_rank output needs every input to be a LoRA adapter"):
        merge({"method": "ties", "base_model": str(root / "base"), "lora_rank": 2,
               "models": [str(root / "a0"), str(root / "m1")]}, tmp_path / "o", show_progress=False)


def test_pickle_adapters_are_refused_unless_allowed_and_then_equal_the_safetensors_one(lora_setup, tmp_path):
    """A peft adapter saved as adapter_model.bin: refused with how to convert it; with pickle allowed (the CLI's
    --allow-pickle) read by torch.load(weights_only=True), the merge engine and TaskVector.from_peft alike."""
    from taskvec import TaskVector
    from taskvec.merge import LoraAdapter
    from taskvec.merge.engine import Checkpoint
    from taskvec.modeling import pickle_allowed

    root, *_ = lora_setup
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "adapter_config.json").write_text((root / "a0" / "adapter_config.json").read_text())
    torch.save(load_file(str(root / "a0" / "adapter_model.safetensors")), pk / "adapter_model.bin")
    with pytest.raises(MergeError, match=r"only pickle adapter weights \(adapter_model.bin\).*--allow-pickle"):
        LoraAdapter(pk, Checkpoint)
    with pytest.raises(Exception, match=r"only pickle adapter weights"):
        TaskVector.from_peft(str(pk))
    with pickle_allowed():
        ad, ref = LoraAdapter(pk, Checkpoint), LoraAdapter(root / "a0", Checkpoint)
        assert set(ad.targets) == set(ref.targets)
        for name in ref.targets:
            assert torch.equal(ad.delta(name), ref.delta(name))
        tv, tv_ref = TaskVector.from_peft(str(pk)), TaskVector.from_peft(str(root / "a0"))
    assert set(tv.deltas) == set(tv_ref.deltas) and all(torch.equal(tv.deltas[k], tv_ref.deltas[k]) for k in tv.deltas)
