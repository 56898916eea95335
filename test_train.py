"""Tests for train.py: the BPE vocabulary and RefreshKV-aware attention."""
import random

import pytest
import torch

import tasks
import train
from model import ModelArgs, Transformer
from policies import RefreshKV
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def bpe():
    rng = random.Random(0)
    text = "".join(tasks.make_example(t, s, 1500, 4).prompt for s in range(4) for t in tasks.TASK_NAMES)
    return text, train.train_bpe(text, 400)


def test_bpe_ranks_round_trip_and_rank_file(bpe, tmp_path):
    text, ranks = bpe
    assert len(ranks) == 400 and sorted(ranks.values()) == list(range(400))
    assert all(ranks[bytes([i])] == i for i in range(256))
    tok = Tokenizer(ranks, n_special=2, name="t")
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text) / 1.5  # merges shorten task text
    assert tok.decode(tok.encode("Ünïcode ✓ and <|end_of_text|> as text")) == "Ünïcode ✓ and <|end_of_text|> as text"
    tok.save(tmp_path / "tokenizer.model")
    again = Tokenizer.from_file(tmp_path / "tokenizer.model", 402)
    assert again.encode(text) == ids
    assert (again.bos_id, again.eos_ids) == (400, {401})  # special tokens right after the ranks


def test_bpe_merges_the_most_frequent_pair_first():
    ranks = train.train_bpe("ab ab ab ab cd cd", 258)
    assert list(ranks)[256:] == [b"ab", b" ab"]


def teacher_forced_decode(model, tokens, start, policy):
    """Logits of rows start-1 .. end-2 when each answer token is fed back, with `policy`."""
    model.setup_cache(len(tokens))
    out = [model(torch.tensor([tokens[:start]]), 0, policy)[0, -1]]
    for j, tok in enumerate(tokens[start:-1]):
        policy.plan(j + 2)
        out.append(model(torch.tensor([[tok]]), torch.tensor([start + j]), policy)[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("stride, budget", [(1, 5), (3, 7), (4, 20), (50, 9)])
def test_refresh_attention_is_what_refreshkv_decode_attends_to(stride, budget):
    """Training rows under RefreshAttention give the logits of RefreshKV's teacher-forced decode
    (without pooling, so that no two scores tie at the K-th place)."""
    torch.manual_seed(stride)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                  hidden_dim=96, max_seq_len=128)).eval()
    T, start = 60, 41
    tokens = torch.randint(0, 50, (T,)).tolist()
    with torch.no_grad():
        want = teacher_forced_decode(model, tokens, start, RefreshKV(budget=budget, stride=stride, pool=1))
        attn = train.RefreshAttention(torch.tensor([start]), torch.tensor([T - start]), torch.tensor([budget]),
                                      stride, pool_kernel=1)
        got = model(torch.tensor([tokens]), policy=attn)[0, start - 1:T - 1]
        causal = model(torch.tensor([tokens]))[0, start - 1:T - 1]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    if stride > 1:  # partial rows really differ from full attention
        assert not torch.allclose(got, causal, atol=1e-3)
