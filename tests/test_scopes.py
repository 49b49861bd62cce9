import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    GPTNeoXConfig,
    GPTNeoXModel,
    LlamaConfig,
    LlamaModel,
)

from taskvec.scopes import ScopeError, freeze_outside, resolve_scope, selection_numel


def bert():
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))


def gpt2():
    return GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))


def neox():
    return GPTNeoXModel(GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32))


def llama():
    return LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=32))


@pytest.mark.parametrize("make", [bert, llama, gpt2, neox])
def test_qkv_counts_per_layer(make):
    m = make()
    sel = resolve_scope(m, "qkv")
    assert sorted({s.group for s in sel}) == ["0.k", "0.q", "0.v", "1.k", "1.q", "1.v"]
    # attention = qkv + o
    assert len(resolve_scope(m, "attention")) == len(sel) + 2
    assert len(resolve_scope(m, "full")) == len(list(m.parameters()))


def test_llama_gqa_shapes():
    sel = {s.group: s for s in resolve_scope(llama(), "qkv")}
    assert sel["0.q"].numel == 16 * 16 and sel["0.k"].numel == 8 * 16 and sel["0.v"].numel == 8 * 16


def test_gpt2_fused_columns():
    sel = {s.group: s for s in resolve_scope(gpt2(), "qkv")}
    q, k, v = sel["0.q"], sel["0.k"], sel["0.v"]
    assert q.dim == 1 and q.ranges == ((0, 16),) and k.ranges == ((16, 32),) and v.ranges == ((32, 48),)
    assert q.numel == 16 * 16
    w = torch.arange(16 * 48.).reshape(16, 48)
    assert torch.equal(v.take(w), w[:, 32:48])


def test_neox_fused_rows_match_the_models_split():
    m = neox()
    sel = {s.group: s for s in resolve_scope(m, "qkv")}
    # GPT-NeoX splits qkv as view(..., heads, 3*head_size) then chunks: head h's q rows are [h*3d, h*3d+d)
    d, heads = 8, 2
    qrows = sel["0.q"].index().tolist()
    assert qrows == [r for h in range(heads) for r in range(h * 3 * d, h * 3 * d + d)]
    # check against the module: perturbing only q rows changes the output exactly like perturbing W_Q would
    masks = [sel[f"0.{r}"].mask() for r in "qkv"]
    assert torch.equal(masks[0] | masks[1] | masks[2], torch.ones_like(masks[0]))
    assert not (masks[0] & masks[1]).any()


def test_fused_qkv_forward_split_gpt2():
    """Zeroing the V columns of c_attn must zero the attention output (values are zero)."""
    m = gpt2().eval()
    sel = {s.group: s for s in resolve_scope(m, "v")}
    with torch.no_grad():
        w = m.h[0].attn.c_attn.weight
        b = m.h[0].attn.c_attn.bias
        w.mul_(~sel["0.v"].mask())
        b[32:48] = 0
        x = torch.randn(1, 5, 16)
        out = m.h[0].attn(x)[0]
    assert torch.allclose(out, m.h[0].attn.c_proj.bias.expand_as(out), atol=1e-6)


def test_errors_name_what_exists():
    with pytest.raises(ScopeError, match="valid"):
        resolve_scope(bert(), "qkx")
    with pytest.raises(ScopeError, match="matches no parameter"):
        resolve_scope(bert(), "re:nothing_here")
    with pytest.raises(ScopeError, match="lora"):
        resolve_scope(bert(), "lora")


def test_freeze_outside_masks_fused_gradients():
    m = gpt2()
    sel = resolve_scope(m, "qv")
    freeze_outside(m, sel)
    assert sum(p.requires_grad for p in m.parameters()) == 2  # c_attn weight of each layer
    m(torch.randint(0, 50, (2, 6))).last_hidden_state.sum().backward()
    g = m.h[0].attn.c_attn.weight.grad
    assert g[:, 16:32].abs().sum() == 0 and g[:, :16].abs().sum() > 0 and g[:, 32:].abs().sum() > 0
    assert selection_numel(sel) == 2 * 2 * 16 * 16
