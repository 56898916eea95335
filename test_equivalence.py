"""Property tests of the policies (../shared/SPEC.md, properties 1-5) and unit tests of each
policy's selection on hand-made scores."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import policies
from model import ModelArgs, Transformer
from policies import POLICIES, H2O, TOVA, Oracle, Policy, Quest, RefreshKV, SnapKV, StreamingLLM
from refreshkv import generate

DEV = "cuda" if torch.cuda.is_available() else "cpu"

EVICTION = ["streamingllm", "snapkv", "h2o", "tova"]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def tiny_model(seed, n_layers, n_kv_heads, group):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32 * n_kv_heads * group // 2, n_layers=n_layers, n_heads=n_kv_heads * group,
                     n_kv_heads=n_kv_heads, head_dim=16, vocab_size=64, hidden_dim=64, max_seq_len=512)
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)  # peaked attention, so that selections matter
    return model


cases = st.fixed_dictionaries(dict(
    seed=st.integers(0, 10_000), n_layers=st.integers(1, 3), n_kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]), prompt_len=st.integers(2, 70), new=st.integers(1, 24)))


def run(case, policy):
    model = tiny_model(case["seed"], case["n_layers"], case["n_kv_heads"], case["group"])
    prompt = torch.randint(0, 64, (case["prompt_len"],), generator=torch.Generator().manual_seed(case["seed"])).tolist()
    out = list(generate(model, prompt, policy, case["new"]))
    return [t for t, _ in out], torch.stack([l for _, l in out])


# ---- Properties 1-3: policies that see everything equal full attention ----

@SETTINGS
@given(cases, st.integers(1, 100))
def test_refreshkv_stride_1_is_full_attention_bitwise(case, budget):
    tokens, logits = run(case, Policy())
    got_tokens, got_logits = run(case, RefreshKV(budget, stride=1))
    assert got_tokens == tokens and torch.equal(got_logits, logits)


@SETTINGS
@given(cases, st.integers(1, 100))
def test_similarity_schedule_that_always_triggers_is_full_attention_bitwise(case, budget):
    tokens, logits = run(case, Policy())
    got_tokens, got_logits = run(case, RefreshKV(budget, stride=1, threshold=1.01))
    assert got_tokens == tokens and torch.equal(got_logits, logits)


@SETTINGS
@given(cases, st.sampled_from(list(POLICIES)), st.integers(0, 20))
def test_every_policy_with_budget_covering_everything_is_full_attention(case, name, extra):
    tokens, logits = run(case, Policy())
    budget = case["prompt_len"] + case["new"] + extra
    kw = {} if name == "full" else dict(budget=budget)
    got_tokens, got_logits = run(case, POLICIES[name](**kw))
    assert got_tokens == tokens
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in POLICIES if n != "full"])
def test_budget_far_above_a_short_prompt_is_full_attention(name):
    """Fixed cases the property test rarely draws: K much larger than the prompt, so empty slots last."""
    case = dict(seed=3, n_layers=2, n_kv_heads=2, group=2, prompt_len=10, new=30)
    tokens, logits = run(case, Policy())
    got_tokens, got_logits = run(case, POLICIES[name](budget=64))
    assert got_tokens == tokens
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)


# ---- Property 4: right after a full step, the small cache is that step's top-K ----

class Recorded(RefreshKV):
    """RefreshKV that checks its small cache after every full step against an independent top-K."""

    def attend(self, layer, q, k, v, pos, q_raw):
        full_before = self.stats()["full"]
        out = super().attend(layer, q, k, v, pos, q_raw)
        if self.stats()["full"] > full_before:
            check_top_k(self.small[layer], q, k[:, :int(pos) + 1], self.budget)
            self.checked += 1
        return out


def check_top_k(small, q, k, budget, kernel=7):
    """Recompute in float64: softmax per query head, max over the group, max-pool by hand, top-K."""
    Hkv, T, D = k.shape
    s = (q.view(Hkv, -1, D).double() @ k.double().transpose(1, 2)) / math.sqrt(D)  # [Hkv, G, T]
    scores = s.softmax(-1).amax(1)  # [Hkv, T]
    padded = F.pad(scores, (kernel // 2, kernel // 2), value=-1.0)
    pooled = torch.stack([padded[:, i:i + T] for i in range(kernel)]).amax(0)
    assert small.shape == (Hkv, budget)
    for h in range(Hkv):
        members = small[h][small[h] >= 0]
        assert len(members) == min(budget, T) and members.max() < T  # empty slots only when T < K
        chosen = torch.zeros(T, dtype=torch.bool)
        chosen[members] = True
        assert chosen.sum() == len(members)  # no repeats
        if (~chosen).any():  # a top-K: nothing left out scores above anything kept (ties may go either way)
            assert pooled[h][chosen].min() >= pooled[h][~chosen].max() - 1e-6


@SETTINGS
@given(cases, st.integers(1, 40), st.integers(1, 5))
def test_small_cache_after_full_step_is_top_k_of_pooled_scores(case, budget, stride):
    policy = Recorded(budget, stride=stride)
    policy.checked = 0
    run(case, policy)
    full_steps = sum(t % stride == 0 for t in range(2, case["new"] + 1))  # token t comes from step t
    assert policy.checked == policy.stats()["full"] == case["n_layers"] * full_steps


def test_top_k_check_catches_a_wrong_pooling_kernel():
    torch.manual_seed(0)
    q, k = torch.randn(4, 16), torch.randn(2, 60, 16) * 3
    policy = RefreshKV(8)
    policy.n_kv = 2
    policy.small[0], policy.rank[0], policy.q_mean[0] = torch.empty(2, 8, dtype=torch.long), torch.empty(2, 8), torch.empty(16)
    policy.refresh(0, policies.decode_attention(q, k, k, torch.tensor([59]), None, True, "torch")[1], q)
    check_top_k(policy.small[0], q, k, 8)
    with pytest.raises(AssertionError):
        check_top_k(policy.small[0], q, k, 8, kernel=3)


# ---- Property 5: eviction never brings a position back; nobody exceeds its budget ----

def record_selections(policy):
    """Wrap policy.run to record (layer-step T, idx) of every attention the policy runs."""
    seen, inner = [], policy.run

    def run(q, k, v, pos, idx=None, scores=False, extra=0):
        seen.append((int(pos) + 1, None if idx is None else idx.clone()))
        return inner(q, k, v, pos, idx, scores, extra)
    policy.run = run
    return seen


@SETTINGS
@given(cases, st.sampled_from(list(POLICIES)), st.integers(5, 40))
def test_no_return_after_eviction_and_budgets_hold(case, name, budget):
    if name == "full":
        budget = None
    policy = POLICIES[name](**({} if budget is None else dict(budget=budget)))
    seen = record_selections(policy)
    run(case, policy)
    L, per_layer = case["prompt_len"], case["n_layers"]
    dropped = {}  # (layer, KV head) -> positions gone for good
    for i, (T, idx) in enumerate(seen):
        layer = i % per_layer
        if idx is None:  # a full step: documented for full, refreshkv's full steps, quest's dense layers
            assert name in ("full", "refreshkv") or (name == "quest" and layer < 2)
            continue
        extras = {"snapkv": T - 1 - L, "quest": (-budget) % 16 + 15}.get(name, 0)
        for h in range(idx.shape[0]):
            chosen = idx[h][idx[h] >= 0].tolist()  # entries < 0 are empty slots
            assert len(chosen) <= budget + extras, f"{name} attends to {len(chosen)} > {budget} + {extras}"
            assert all(0 <= c < T - 1 for c in chosen) and len(set(chosen)) == len(chosen)  # past, no repeats
            if name in EVICTION:
                gone = dropped.setdefault((layer, h), set())
                assert not set(chosen) & gone, f"{name} re-selected dropped positions {set(chosen) & gone}"
                gone |= set(range(T - 1)) - set(chosen)


# ---- Graph safety: attend updates state in place, so a captured decode step stays valid ----

def state_tensors(policy):
    """Every tensor the policy keeps in its per-layer (or per-kind) dicts, by (attribute, key)."""
    return {(k, layer): t for k, v in vars(policy).items() if isinstance(v, dict)
            for layer, t in v.items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("name", [n for n in POLICIES if n != "full"])
def test_state_is_updated_in_place(name):
    model = tiny_model(0, 3, 2, 2)
    policy = POLICIES[name](budget=12)
    gen = generate(model, list(range(40)), policy, 12)
    next(gen)  # after the prefill
    state = state_tensors(policy)
    ptrs = {key: t.data_ptr() for key, t in state.items()}
    for _ in gen:
        pass
    now = state_tensors(policy)
    assert now.keys() == state.keys() and all(now[key] is state[key] and t.data_ptr() == ptrs[key]
                                              for key, t in now.items())


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", list(POLICIES))
def test_cuda_graph_replay_matches_running_each_step(name):
    model = tiny_model(0, 3, 2, 2).to(DEV)
    prompt = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = {} if name == "full" else dict(budget=24, **({"stride": 4} if name == "refreshkv" else {}))
    eager = list(generate(model, prompt, POLICIES[name](**kw), 40, graphs=False))
    graphs = {}
    replayed = list(generate(model, prompt, POLICIES[name](**kw), 40, graphs=graphs))
    assert graphs and [t for t, _ in replayed] == [t for t, _ in eager]
    torch.testing.assert_close(torch.stack([l for _, l in replayed]), torch.stack([l for _, l in eager]))


# ---- Hand-made scores: each policy's selection where the right answer can be written down ----

def test_pool_group_max_top_and_drop_lowest():
    assert policies.pool(torch.tensor([[0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 0, 0, 0]])).tolist() == \
        [[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]
    probs = torch.tensor([[.1, .5], [.3, .2], [.9, 0], [0, .4]])  # 4 query heads, 2 KV heads
    assert torch.equal(policies.group_max(probs, 2), torch.tensor([[.3, .5], [.9, .4]]))
    pos, rank = torch.tensor([[10, 11, 12, 13]]), torch.tensor([[.5, .1, .7, .9]])
    kept, kept_rank = policies.drop_lowest(rank, pos, rank)
    assert sorted(kept[0].tolist()) == [10, 12, 13] and sorted(kept_rank[0].tolist()) == pytest.approx([.5, .7, .9])
    idx, val = policies.top(torch.tensor([[.1, .7, .3, .9]]), 3, last=torch.tensor([2]))  # position 3 not yet there
    assert sorted(idx[0].tolist()) == [0, 1, 2]
    idx, val = policies.top(torch.tensor([[.1, .7]]), 3)  # fewer positions than slots: an empty slot
    assert sorted(idx[0].tolist()) == [-1, 0, 1] and val[0][idx[0] == -1] == float("-inf")


def fake_attention(monkeypatch, probs_for):
    """Make decode_attention return hand-made probabilities probs_for(T, idx) and record idx."""
    calls = []

    def attention(q, k, v, pos, idx=None, scores=False, kernel="auto"):
        calls.append(None if idx is None else idx.clone())
        return torch.zeros_like(q), probs_for(int(pos) + 1, idx) if scores else None
    monkeypatch.setattr(policies, "decode_attention", attention)
    return calls


def qkv(T, H=2, Hkv=1, D=4, N=None):
    """q, and a cache k, v of N (default T) positions whose current token is T - 1 -> (q, k, v, pos)."""
    return torch.zeros(H, D), torch.zeros(Hkv, N or T, D), torch.zeros(Hkv, N or T, D), torch.tensor([T - 1])


def valid(idx):
    return [[p for p in row if p >= 0] for row in idx.tolist()]


def test_refreshkv_refresh_join_and_evict(monkeypatch):
    spike = torch.zeros(2, 20)  # two query heads of one KV head, a prompt of 20
    spike[0, 0], spike[1, 17] = 0.9, 0.5  # pooled: .9 on 0..3, .5 on 14..19: the top-4 is 0..3
    monkeypatch.setattr(policies, "prompt_probs", lambda q, k: spike[:, None])
    p = RefreshKV(budget=4, stride=3)
    q, k, v, pos = qkv(20)
    p.prefill(0, q[:, None].expand(-1, 20, -1), k, q[:, None])
    assert sorted(p.small[0][0].tolist()) == [0, 1, 2, 3] and p.rank[0].tolist() == [[pytest.approx(.9)] * 4]
    p.small[0], p.rank[0] = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[.9, .8, .6, .7]])
    calls = fake_attention(monkeypatch, lambda T, idx: torch.zeros(2, T))
    p.plan(2)
    q, k, v, pos = qkv(21)  # step t=2: partial; the current token 20 joins, the lowest-ranked member leaves
    p.attend(0, q, k, v, pos, q)
    assert calls[-1].tolist() == [[0, 1, 2, 3]]
    assert sorted(p.small[0][0].tolist()) == [0, 1, 3, 20]
    probs = torch.zeros(2, 22)
    probs[1, 21] = 1.0  # pooled: 18..21 on top
    fake_attention(monkeypatch, lambda T, idx: probs)
    p.plan(3)
    q, k, v, pos = qkv(22)  # t=3: full step, attends to everything and refreshes from its scores
    p.attend(0, q, k, v, pos, q)
    assert p.stats()["full"] == 1 and sorted(p.small[0][0].tolist()) == [18, 19, 20, 21]
    p.small[0], p.rank[0] = torch.tensor([[18, 19, 20, 21]]), torch.tensor([[.5, .4, .3, .2]])
    for t, T in ((4, 23), (5, 24)):  # partial; joined tokens rank highest, the lowest scores leave first
        p.plan(t)
        q, k, v, pos = qkv(T)
        p.attend(0, q, k, v, pos, q)
    assert sorted(p.small[0][0].tolist()) == [18, 19, 22, 23]
    p.small[0], p.rank[0] = torch.tensor([[5, 23]]), torch.tensor([[.3, 24.0]])  # 23 joined earlier
    for t, T in ((7, 25), (8, 26)):  # first 5 leaves, then the oldest joined token, 23
        p.plan(t)
        q, k, v, pos = qkv(T + 1)
        p.attend(0, q, k, v, pos, q)
    assert sorted(p.small[0][0].tolist()) == [25, 26]


def test_refreshkv_fills_empty_slots_before_evicting(monkeypatch):
    monkeypatch.setattr(policies, "prompt_probs", lambda q, k: torch.tensor([[[.3, .1, .2]]] * 2))
    p = RefreshKV(budget=5, stride=10, pool=1)
    q, k, v, pos = qkv(3, N=10)
    p.prefill(0, q[:, None].expand(-1, 3, -1), k, q[:, None])  # a prompt of 3 < K: two empty slots
    assert sorted(p.small[0][0].tolist()) == [-1, -1, 0, 1, 2]
    fake_attention(monkeypatch, lambda T, idx: None)
    for t, T in ((2, 4), (3, 5), (4, 6)):
        p.plan(t)
        q, k, v, pos = qkv(T, N=10)
        p.attend(0, q, k, v, pos, q)
    assert sorted(p.small[0][0].tolist()) == [0, 2, 3, 4, 5]  # 3 and 4 filled the empty slots, then 1 left


def test_refreshkv_similarity_schedule_decides_per_layer(monkeypatch):
    fake_attention(monkeypatch, lambda T, idx: torch.full((2, T), 1.0 / T))
    monkeypatch.setattr(policies, "prompt_probs", lambda q, k: torch.full((2, 1, k.shape[1]), 0.1))
    p = RefreshKV(budget=4, stride=2, threshold=0.85)
    _, k, _, _ = qkv(10)
    same, turned = torch.tensor([[1.0, 0, 0, 0]] * 2), torch.tensor([[0, 1.0, 0, 0]] * 2)
    for layer in (0, 1):
        p.prefill(layer, same[:, None].expand(-1, 10, -1), k, same[:, None])
    assert p.plan(3) == "partial"
    q, k, v, pos = qkv(12)  # t=3: not a check step, partial whatever the query
    p.attend(0, turned, k, v, pos, turned)
    assert p.stats()["full"] == 0
    assert p.plan(4) is None  # a check step reads the similarity on the host: no CUDA graph
    q, k, v, pos = qkv(13)  # t=4: layer 0's query turned (cos 0) -> full, layer 1's did not -> partial
    p.attend(0, turned, k, v, pos, turned)
    p.attend(1, same, k, v, pos, same)
    assert p.stats()["full"] == 1


def test_streamingllm_keeps_sinks_and_recent(monkeypatch):
    calls = fake_attention(monkeypatch, lambda T, idx: None)
    p = StreamingLLM(budget=6, sinks=2)
    q, k, v, pos = qkv(21)  # 20 past positions
    p.prefill(0, q[:, None].expand(-1, 20, -1), k, None)
    p.attend(0, q, k, v, pos, q)
    assert calls[-1].tolist() == [[0, 1, 16, 17, 18, 19]]
    q, k, v, pos = qkv(5)  # fewer past positions than the budget: all of them, and two empty slots
    p.attend(0, q, k, v, pos, q)
    assert sorted(valid(calls[-1])[0]) == [0, 1, 2, 3] and calls[-1].shape == (1, 6)


def test_snapkv_keeps_voted_window_and_generated(monkeypatch):
    votes = torch.zeros(2, 2, 30)  # 2 heads (one group), window 2, prompt of 30
    votes[0, 0, 5] = votes[1, 1, 20] = 0.8
    monkeypatch.setattr(policies, "prompt_probs", lambda q, k: votes)
    p = SnapKV(budget=2 + 7 + 7, window=2)
    q, k, _, _ = qkv(30, N=40)
    p.prefill(0, q[:, None].expand(-1, 30, -1), k, None)
    assert sorted(valid(p.kept[0])[0]) == list(range(2, 9)) + list(range(17, 24)) + [28, 29]
    calls = fake_attention(monkeypatch, lambda T, idx: None)
    for T in (31, 32, 33):  # tokens 30, 31 and 32 are generated; each is kept from then on
        q, k, v, pos = qkv(T, N=40)
        p.attend(0, q, k, v, pos, q)
    assert valid(calls[-1])[0][-2:] == [30, 31] and len(valid(calls[-1])[0]) == 16 + 2


def test_h2o_keeps_recent_and_heavy_and_evicts_lightest(monkeypatch):
    L = 12
    probs = torch.eye(L).repeat(2, 1, 1)  # [2 heads, L queries, L positions]: each query on itself...
    probs[0, 3:] = 0
    probs[0, 3:, 3] = 1.0  # ...but head 0's queries from 3 on put their mass on 3, head 1's from 6 on on 6
    probs[1, 6:] = 0
    probs[1, 6:, 6] = 1.0
    monkeypatch.setattr(policies, "prompt_probs", lambda q, k: probs[:, k.shape[1] - q.shape[1]:k.shape[1], :k.shape[1]])
    p = H2O(budget=4, block=5)
    q, k, _, _ = qkv(L, N=20)
    p.prefill(0, q[:, None].expand(-1, L, -1), k, None)
    acc = dict(zip(p.kept[0][0].tolist(), p.acc[0][0].tolist()))
    assert acc == {3: 9.0, 6: 6.0, 10: 0.0, 11: 0.0}  # heavy 3 and 6 (group max, summed), recent 10 and 11
    step = {3: .5, 6: .2, 10: .4, 11: 0.0, 12: 0.0}  # this step's scores; 12 is the current token
    fake_attention(monkeypatch, lambda T, idx: torch.tensor([[step[i] for i in idx[0].tolist() + [12]]] * 2))
    q, k, v, pos = qkv(L + 1, N=20)  # 12 joins; 10 is no longer recent and, lightest of 3, 6, 10, leaves
    p.attend(0, q, k, v, pos, q)
    acc = dict(zip(p.kept[0][0].tolist(), p.acc[0][0].tolist()))
    assert acc == {3: 9.5, 6: pytest.approx(6.2), 11: 0.0, 12: 0.0}


def test_tova_drops_the_lowest_mean_score(monkeypatch):
    monkeypatch.setattr(policies, "prompt_probs",
                        lambda q, k: torch.tensor([[.1, .4, .2, .3, 0], [.3, .4, 0, .1, .2]])[:, None])
    p = TOVA(budget=3)
    q, k, _, _ = qkv(5, N=8)
    p.prefill(0, q[:, None].expand(-1, 5, -1), k, None)
    assert sorted(p.kept[0][0].tolist()) == [0, 1, 3]  # means .2 .4 .1 .2 .1
    kept = p.kept[0][0].tolist()
    mean_by_pos = {0: .05, 1: .3, 3: .4, 5: .25}  # this step's scores; 5 is the current token
    fake_attention(monkeypatch, lambda T, idx: torch.tensor([[mean_by_pos[i] for i in kept + [5]]] * 2))
    q, k, v, pos = qkv(6, N=8)
    p.attend(0, q, k, v, pos, q)
    assert sorted(p.kept[0][0].tolist()) == [1, 3, 5]


def test_quest_picks_pages_by_bound_and_always_the_newest(monkeypatch):
    calls = fake_attention(monkeypatch, lambda T, idx: None)
    P, T = 4, 19  # pages 0-3 full, page 4 holds 16, 17 and the current token 18
    k = torch.zeros(1, 24, 2)
    k[0, 9, 0] = 5.0  # page 2 has a large key along the query's direction
    k[0, 2, 0] = -5.0  # page 0 only a large negative one
    q = torch.tensor([[1.0, 0.0]])
    p = Quest(budget=8, page_size=P)  # two pages: the newest and the best other one
    p.prefill(2, q[:, None].expand(-1, 18, -1), k, None)
    p.attend(2, q, k, k, torch.tensor([18]), q)
    assert sorted(valid(calls[-1])[0]) == [8, 9, 10, 11, 16, 17]
    p.attend(0, q, k, k, torch.tensor([18]), q)  # the first two layers attend densely
    assert calls[-1] is None


def test_oracle_attends_to_the_top_k_of_this_step(monkeypatch):
    probs = torch.tensor([[.1, .5, .05, .3, .05], [.2, .1, .4, .2, .1]])  # 4 past positions + current
    calls = fake_attention(monkeypatch, lambda T, idx: probs)
    p = Oracle(budget=2)
    q, k, v, pos = qkv(5)
    p.prefill(0, q[:, None].expand(-1, 4, -1), k, q[:, None])
    p.attend(0, q, k, v, pos, q)
    assert calls[0] is None and sorted(calls[1][0].tolist()) == [1, 2]  # group max .2 .5 .4 .3
    c = p.stats()
    assert c["full"] == 1 and c["read"] == 5 + 3
