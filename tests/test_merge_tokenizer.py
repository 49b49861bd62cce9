"""Merges of models with different vocabularies (tokenizer_source) and embedding tying (taskvec/merge/tokenizer.py).

Tiny Llama models with tiny WordLevel tokenizers built in-process, each model's vocabulary a different
list (tokens missing, extra, and at other ids). Every expected row is computed here token by token from the
saved tensors with mergekit 0.1.5's fill rule written out as a loop (the one model that has the token, else
the base, else the mean of those that have it), never through the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskvec.merge import MergeError, merge

SPECIALS = ["<unk>", "<s>"]


def _tokenizer(words, extra_special=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>")
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tok


def _llama(path: Path, words, seed: int, tied=False, extra_special=()):
    """A tiny Llama whose rows are random (seeded) and whose tokenizer has ``words`` (+ specials)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(words, extra_special)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=32,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _state(d: Path) -> dict:
    out = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def _vocab(d: Path) -> dict:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d)).get_vocab()


def _rows(d: Path, key: str) -> dict:
    """token -> row of tensor ``key`` (a tied model's LM head is its embedding)."""
    st = _state(d)
    x = st.get(key, st["model.embed_tokens.weight"])
    return {t: x[i] for t, i in _vocab(d).items() if i < x.shape[0]}


def _filled(models: list[dict], token: str, base: int = 0):
    """mergekit 0.1.5's row for ``token`` in a model that lacks it: models[i] maps token -> row."""
    have = [m[token] for m in models if token in m]
    if len(have) == 1:
        return have[0]
    if not have:
        return None
    if token in models[base]:
        return models[base][token]
    return sum(h.float() for h in have) / len(have)


def _expected_task_arithmetic(dirs, key, out_vocab, lam=1.0):
    """θ0' + λ Σ_t (θ_t' − θ0') per output token, the primes being the rows after filling."""
    rows = [_rows(d, key) for d in dirs]
    out = {}
    for tok in out_vocab:
        filled = [r[tok].float() if tok in r else _filled(rows, tok) for r in rows]
        base = filled[0]
        out[tok] = base + lam * sum(f - base for f in filled[1:])
    return out


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabs")
    base = _llama(root / "base", ["a", "b", "c", "d"], seed=0)
    ft_a = _llama(root / "ftA", ["a", "c", "x", "d"], seed=1)  # lacks b, has x, c and d at other ids
    ft_b = _llama(root / "ftB", ["d", "b", "a", "y", "x", "c"], seed=2, extra_special=["<tool>"])
    return root, [base, ft_a, ft_b]


def _cfg(dirs, method="task_arithmetic", **kw):
    return {"method": method, "base_model": str(dirs[0]),
            "models": [{"model": str(d), "name": d.name} for d in dirs[1:]]} | kw


def test_union_permutes_fills_and_saves_the_merged_tokenizer(vocabs, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    root, dirs = vocabs
    out = tmp_path / "union"
    merge(_cfg(dirs, tokenizer_source="union"), out, show_progress=False)
    tok = AutoTokenizer.from_pretrained(str(out))
    vocab = tok.get_vocab()
    base_vocab = _vocab(dirs[0])
    # the base's ids unchanged; every other model's tokens added; the added special token kept as special
    assert all(vocab[t] == i for t, i in base_vocab.items())
    assert set(vocab) == set(base_vocab) | {"x", "y", "<tool>"}
    specials = {info.content for info in tok.added_tokens_decoder.values() if info.special}
    assert "<tool>" in specials and "x" not in specials
    assert sorted(vocab.values()) == list(range(len(vocab)))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == len(vocab)
    st = _state(out)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert st[key].shape == (len(vocab), 16)
        want = _expected_task_arithmetic(dirs, key, vocab)
        for t, i in vocab.items():
            torch.testing.assert_close(st[key][i], want[t].to(st[key].dtype), rtol=1e-6, atol=1e-6, msg=f"{key} {t}")
    # the cases spelled out: a token only B has is B's row; one the base lacks is merged around the mean
    yb = _rows(dirs[2], "model.embed_tokens.weight")["y"]
    torch.testing.assert_close(st["model.embed_tokens.weight"][vocab["y"]], yb)
    # the merged directory loads with plain transformers and encodes the new tokens to the merged rows
    model = LlamaForCausalLM.from_pretrained(str(out))
    ids = tok("a x y <tool>", add_special_tokens=False)["input_ids"]
    assert ids == [vocab["a"], vocab["x"], vocab["y"], vocab["<tool>"]]
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), st["model.embed_tokens.weight"])
    assert tok.decode(ids, skip_special_tokens=True) == "a x y"  # <tool> is still a special token


def test_union_fills_a_missing_token_from_the_base_when_it_has_it(vocabs, tmp_path):
    root, dirs = vocabs
    out = tmp_path / "o"
    merge(_cfg(dirs, tokenizer_source="union"), out, show_progress=False)
    st, vocab = _state(out), _vocab(out)
    rows = [_rows(d, "model.embed_tokens.weight") for d in dirs]
    # b: A lacks it, so A agrees with the base there: merged = base + (B − base)
    want = rows[2]["b"]
    torch.testing.assert_close(st["model.embed_tokens.weight"][vocab["b"]], want, rtol=1e-6, atol=1e-6)
    # x: the base lacks it, A and B have it: every model starts from their mean; merged = A + B − mean = mean
    mean = (rows[1]["x"] + rows[2]["x"]) / 2
    torch.testing.assert_close(st["model.embed_tokens.weight"][vocab["x"]], mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("source", ["base", "model:ftB"])
def test_base_or_one_models_vocabulary(vocabs, tmp_path, source):
    root, dirs = vocabs
    out = tmp_path / "o"
    merge(_cfg(dirs, tokenizer_source=source), out, show_progress=False)
    src = dirs[0] if source == "base" else dirs[2]
    vocab = _vocab(out)
    assert vocab == _vocab(src)
    st = _state(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == st["model.embed_tokens.weight"].shape[0]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        want = _expected_task_arithmetic(dirs, key, vocab)
        for t, i in vocab.items():
            torch.testing.assert_close(st[key][i], want[t], rtol=1e-6, atol=1e-6, msg=f"{key} {t}")


def test_the_mergekit_form_of_a_model_source_and_bad_sources(vocabs, tmp_path):
    from taskvec.merge import load_config, to_mergekit

    root, dirs = vocabs
    cfg = load_config(_cfg(dirs, tokenizer_source=str(dirs[1])))  # mergekit names the model by its path
    assert cfg.tokenizer_source == "model:ftA"
    assert to_mergekit(cfg)["tokenizer_source"] == str(dirs[1])
    assert to_mergekit(load_config(_cfg(dirs, tokenizer_source="union")))["tokenizer_source"] == "union"
    with pytest.raises(MergeError, match=r"tokenizer_source: 'model:nope' is not base, union, or model:NAME.*ftA, ftB"):
        load_config(_cfg(dirs, tokenizer_source="model:nope"))
    with pytest.raises(MergeError, match="tokenizer_source: expected one of"):
        load_config(_cfg(dirs, tokenizer_source=3))


def test_vocabulary_mismatch_without_a_source_is_an_error_that_names_the_fix(vocabs, tmp_path):
    root, dirs = vocabs
    with pytest.raises(MergeError, match=r"different vocabulary sizes.*ftB.*tokenizer_source"):
        merge(_cfg([dirs[0], dirs[2]]), tmp_path / "o", show_progress=False)
    same_size = _llama(tmp_path / "same", ["a", "b", "c", "z"], seed=3)  # same size, one token differs
    with pytest.raises(MergeError, match=r"different tokenizers.*tokenizer_source"):
        merge(_cfg([dirs[0], same_size]), tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists()
    merge(_cfg([dirs[0], same_size], tokenizer_source="union"), tmp_path / "o", show_progress=False)
    assert "z" in _vocab(tmp_path / "o")


def test_identical_vocabularies_with_a_source_merge_exactly_as_without(vocabs, tmp_path):
    root, dirs = vocabs
    twin = _llama(tmp_path / "twin", ["a", "b", "c", "d"], seed=5)
    merge(_cfg([dirs[0], twin]), tmp_path / "plain", show_progress=False)
    merge(_cfg([dirs[0], twin], tokenizer_source="union"), tmp_path / "union", show_progress=False)
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "union")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_task_vector_that_changes_embeddings_is_refused_when_the_vocabulary_moves(vocabs, tmp_path):
    from taskvec.task_vector import TaskVector

    root, dirs = vocabs
    twin = _llama(tmp_path / "twin", ["a", "b", "c", "d"], seed=5)
    tv = TaskVector.from_models(str(dirs[0]), str(twin), scope="full", task="twin")
    tv.save(tmp_path / "twin.safetensors")
    cfg = _cfg(dirs, tokenizer_source="union")
    cfg["models"].append({"model": str(tmp_path / "twin.safetensors"), "name": "vec"})
    with pytest.raises(MergeError, match=r"input 'vec'.*task-vector file.*embed_tokens.*tokenizer_source union"):
        merge(cfg, tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists()


# --- tied embeddings -------------------------------------------------------------------------------------


def _tied_pair(tmp_path, base_tied: bool, words_ft=("a", "b", "c", "d")):
    base = _llama(tmp_path / "base", ["a", "b", "c", "d"], seed=0, tied=base_tied)
    fts = [_llama(tmp_path / f"ft{i}", list(words_ft), seed=i + 1, tied=not base_tied) for i in range(2)]
    assert ("lm_head.weight" in _state(base)) != base_tied  # the tied ones were saved without an LM head
    assert all(("lm_head.weight" in _state(f)) == base_tied for f in fts)
    return [base, *fts]


@pytest.mark.parametrize("source", [None, "union"])
def test_tied_base_with_untied_fine_tunes(tmp_path, source):
    from transformers import LlamaForCausalLM

    dirs = _tied_pair(tmp_path, base_tied=True)
    out = tmp_path / "o"
    merge(_cfg(dirs, **({"tokenizer_source": source} if source else {})), out, show_progress=False)
    st = _state(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in st
    b, f0, f1 = (_state(d) for d in dirs)
    emb = b["model.embed_tokens.weight"]  # the base's LM head is its embedding
    torch.testing.assert_close(st["lm_head.weight"], emb + (f0["lm_head.weight"] - emb) + (f1["lm_head.weight"] - emb))
    torch.testing.assert_close(st["model.embed_tokens.weight"], emb + (f0["model.embed_tokens.weight"] - emb)
                               + (f1["model.embed_tokens.weight"] - emb))
    assert not (out / "heads").exists()  # the fine-tunes' LM heads were merged, not taken for task heads
    model = LlamaForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(model.lm_head.weight.detach(), st["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize("source", [None, "union"])
def test_untied_base_with_tied_fine_tunes(tmp_path, source):
    from transformers import LlamaForCausalLM

    dirs = _tied_pair(tmp_path, base_tied=False)
    out = tmp_path / "o"
    merge(_cfg(dirs, **({"tokenizer_source": source} if source else {})), out, show_progress=False)
    st = _state(out)
    b, f0, f1 = (_state(d) for d in dirs)
    head = b["lm_head.weight"]  # the fine-tunes' LM heads are their embeddings
    torch.testing.assert_close(st["lm_head.weight"], head + (f0["model.embed_tokens.weight"] - head)
                               + (f1["model.embed_tokens.weight"] - head))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = LlamaForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(model.lm_head.weight.detach(), st["lm_head.weight"])


def test_all_tied_with_a_union_stays_tied(tmp_path):
    from transformers import LlamaForCausalLM

    base = _llama(tmp_path / "base", ["a", "b", "c"], seed=0, tied=True)
    ft = _llama(tmp_path / "ft", ["c", "q", "a"], seed=1, tied=True)
    out = tmp_path / "o"
    merge(_cfg([base, ft], tokenizer_source="union"), out, show_progress=False)
    st, vocab = _state(out), _vocab(out)
    assert "lm_head.weight" not in st and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    want = _expected_task_arithmetic([base, ft], "model.embed_tokens.weight", vocab)
    for t, i in vocab.items():
        torch.testing.assert_close(st["model.embed_tokens.weight"][i], want[t], rtol=1e-6, atol=1e-6)
    model = LlamaForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_tied_and_a_different_vocabulary_together(tmp_path):
    """A tied base, an untied fine-tune with another vocabulary: LM head rows filled like embedding rows."""
    base = _llama(tmp_path / "base", ["a", "b", "c"], seed=0, tied=True)
    ft = _llama(tmp_path / "ft", ["c", "q", "a"], seed=1, tied=False)
    out = tmp_path / "o"
    merge(_cfg([base, ft], tokenizer_source="union"), out, show_progress=False)
    st, vocab = _state(out), _vocab(out)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        want = _expected_task_arithmetic([base, ft], key, vocab)
        for t, i in vocab.items():
            torch.testing.assert_close(st[key][i], want[t], rtol=1e-6, atol=1e-6, msg=f"{key} {t}")


# --- against mergekit 0.1.5 itself, where it is installed (benchmarks/merge.py's virtualenv) -------------

MERGEKIT = Path(os.environ.get("TASKVEC_MERGEKIT", "/tmp/mk-venv/bin/mergekit-yaml"))


@pytest.mark.slow
@pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit 0.1.5 not installed (set TASKVEC_MERGEKIT)")
@pytest.mark.parametrize("source", ["union", "base"])
def test_union_equals_mergekit_token_by_token(vocabs, tmp_path, source):
    """The same YAML through mergekit-yaml: the same vocabulary and, token by token, the same rows (mergekit
    orders the appended tokens by its tokenizer's dict order, taskvec by id, so rows are compared by token)."""
    import yaml

    root, dirs = vocabs
    cfg = {"merge_method": "task_arithmetic", "base_model": str(dirs[0]), "tokenizer_source": source,
           "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs[1:]], "dtype": "float32"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([str(MERGEKIT), str(tmp_path / "m.yaml"), str(tmp_path / "mk")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    merge(tmp_path / "m.yaml", tmp_path / "tv", show_progress=False)
    vt, vm = _vocab(tmp_path / "tv"), _vocab(tmp_path / "mk")
    assert set(vt) == set(vm)
    st, sm = _state(tmp_path / "tv"), _state(tmp_path / "mk")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        for t in vt:
            torch.testing.assert_close(st[key][vt[t]], sm[key][vm[t]], rtol=1e-6, atol=1e-6, msg=f"{key} {t}")
