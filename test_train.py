"""Tests for train.py: the BPE vocabulary and RefreshKV-aware attention."""
import contextlib
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


def lookahead_by_hand(q, k, start, length, budget, W, pool):
    """RefreshAttention.lookahead_loss's definition, one query row and position at a time (batch 1)."""
    H, T, D = q.shape[1:]
    Hkv = k.shape[1]
    G = H // Hkv
    A = length
    lp = torch.full((Hkv, A + 1, T), float("-inf"), dtype=torch.float64)  # group-max log-probability
    for u in range(A + 1):
        r = start - 1 + u
        for g in range(Hkv):
            for h in range(g * G, (g + 1) * G):
                s = (q[0, h, r].double() @ k[0, g, :r + 1].double().T) / D ** 0.5
                lp[g, u, :r + 1] = torch.maximum(lp[g, u, :r + 1], s.log_softmax(-1))
    score = torch.full_like(lp, float("-inf"))
    for p in range(start):  # prompt positions only, pooled over all positions within pool // 2
        lo, hi = max(0, p - pool // 2), min(T, p + pool // 2 + 1)
        score[:, :, p] = lp[:, :, lo:hi].amax(-1)
    prob = lp.exp()
    prob[:, :, start:] = 0
    want = torch.zeros_like(prob)
    for u in range(A + 1):
        for j in range(1, W):
            if u + j <= A:
                want[:, u] = torch.maximum(want[:, u], prob[:, u + j])
    want[want < 0.05] = 0
    kth = score.sort(-1, descending=True).values[..., budget - 1:budget]
    miss = torch.nn.functional.softplus(kth + 1 - score.clamp(min=-1e4))
    return (want * miss).sum() / want.sum(), (want * (score >= kth)).sum() / want.sum()


@pytest.mark.parametrize("budget, W, pool", [(3, 4, 3), (5, 10, 1), (2, 2, 7)])
def test_lookahead_loss_matches_its_definition(budget, W, pool):
    torch.manual_seed(budget + W)
    B, H, Hkv, T, D, start, length = 1, 4, 2, 18, 8, 11, 6
    q = (3 * torch.randn(B, H, T, D)).requires_grad_()
    k = (3 * torch.randn(B, Hkv, T, D)).requires_grad_()
    attn = train.RefreshAttention(torch.tensor([start]), torch.tensor([length]), torch.tensor([budget]), 5,
                                  pool_kernel=pool, lookahead=W)
    loss, recall = attn.lookahead_loss(q, k)
    want_loss, want_recall = lookahead_by_hand(q.detach(), k.detach(), start, length, budget, W, pool)
    assert 0 < recall < 1 and loss > 0  # the case is not trivial
    assert torch.allclose(loss.double(), want_loss, atol=1e-5) and torch.allclose(recall.double(), want_recall, atol=1e-6)
    loss.backward()  # the loss reaches the queries and keys that choose the positions
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    everything = train.RefreshAttention(torch.tensor([start]), torch.tensor([length]), torch.tensor([start]), 5,
                                        pool_kernel=pool, lookahead=W)
    assert everything.lookahead_loss(q, k)[1] == 1  # a budget of the whole prompt keeps all


def test_lookahead_loss_leaves_the_forward_alone():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                  hidden_dim=96, max_seq_len=128)).eval()
    tokens = torch.randint(0, 50, (1, 60))
    make = lambda W: train.RefreshAttention(torch.tensor([41]), torch.tensor([19]), torch.tensor([9]), 4, lookahead=W)
    with torch.no_grad():
        plain, with_loss = make(0), make(10)
        assert torch.equal(model(tokens, policy=plain), model(tokens, policy=with_loss))
    assert plain.aux == [] and len(with_loss.aux) == 2  # one (loss, recall) per layer


def test_lookahead_total_weights_layers_by_what_they_miss():
    aux = [(torch.tensor(1.0), torch.tensor(0.5)), (torch.tensor(3.0), torch.tensor(0.9))]
    assert torch.isclose(train.lookahead_total(aux), torch.tensor(2.0))  # the plain mean
    # misses 0.5 and 0.1, scaled to mean 1: 5/3 and 1/3
    assert torch.isclose(train.lookahead_total(aux, focus=True), torch.tensor((5 / 3 * 1.0 + 1 / 3 * 3.0) / 2))
    assert torch.isclose(train.lookahead_total(aux, layers=[1]), torch.tensor(3.0))  # layer 1 alone
    assert torch.isclose(train.lookahead_total(aux, focus=True, layers=[0]), torch.tensor(1.0))


def test_lookahead_layers_is_checked_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["train.py", "--aware", "--lookahead", "10", "--lookahead-layers", "4,x"])
    with pytest.raises(SystemExit) as e:
        train.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--lookahead-layers" in err[0]


def test_train_step_counts_only_the_chosen_layers():
    """train_step(layers=[0]): the gradient is the token loss's plus layer 0's look-ahead loss alone.
    Layer 1 comes after layer 0's queries and keys, so its weights get only the token loss's gradient;
    with every layer counted, they get more."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                  hidden_dim=96, max_seq_len=128))
    tokens = torch.randint(0, 50, (1, 61))
    inp, tgt, w = tokens[:, :-1], tokens[:, 1:], torch.ones(1, 60)
    make = lambda W: train.RefreshAttention(torch.tensor([41]), torch.tensor([19]), torch.tensor([9]), 4, lookahead=W)

    def grads(attention, layers=None):
        model.zero_grad()
        train.train_step(model, inp, tgt, w, contextlib.nullcontext(), contextlib.nullcontext, attention, 5.0,
                         False, layers)
        return [layer.attention.wqkv.weight.grad.clone() for layer in model.layers]

    plain = grads(make(0))  # no look-ahead loss
    first = grads(make(10), layers=[0])
    every = grads(make(10))
    assert not torch.allclose(first[0], plain[0], atol=1e-4)  # layer 0's loss counted
    assert torch.allclose(first[1], plain[1], atol=1e-6)  # layer 1's left out
    assert not torch.allclose(every[1], plain[1], atol=1e-4)
