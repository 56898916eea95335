"""Property tests of every registered policy, graph-safety checks on the CPU, and unit tests of
each policy's selection on hand-made scores. POLICIES.md defines the policies and the properties
("Properties" there: P1-P7); each test names the property it checks.

Every test that applies to all policies is parametrized over POLICIES, so a new policy is tested by
adding its class there, and `pytest -k NAME` selects its tests."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, reject, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kernels
import policies
import refreshkv
from model import ModelArgs, Transformer
from policies import POLICIES, H2O, TOVA, Oracle, Policy, Quest, RefreshKV, SnapKV, StreamingLLM, positions
from refreshkv import generate

DEV = "cuda" if torch.cuda.is_available() else "cpu"

NAMES = list(POLICIES)
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
FLOAT32 = dict(rtol=1e-4, atol=1e-4)  # the same positions summed in another order (a permuted selection)


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


def make(name, budget, **knobs):
    """A registered policy with this budget (in tokens; ignored by a policy without one). A budget
    its constructor refuses (below streamingllm's sinks, say) leaves hypothesis's example out."""
    if "budget" in policies.knobs(POLICIES[name]):
        knobs["budget"] = budget
    try:
        return policies.build(name, knobs, 1)
    except ValueError:
        reject()


def model_and_prompt(case):
    model = tiny_model(case["seed"], case["n_layers"], case["n_kv_heads"], case["group"])
    return model, torch.randint(0, 64, (case["prompt_len"],), generator=torch.Generator().manual_seed(case["seed"])).tolist()


def run(case, policy, **kw):
    model, prompt = model_and_prompt(case)
    out = list(generate(model, prompt, policy, case["new"], **kw))
    return [t for t, _ in out], torch.stack([l for _, l in out])


# ---- The registry: specs, knobs, budgets, labels ----

def test_parse_specs_build_and_label():
    specs = policies.parse_specs("full,refreshkv:stride=5,pool=31,snapkv,refreshkv:threshold=none,refresh-only=true")
    assert specs == [("full", {}), ("refreshkv", {"stride": 5, "pool": 31}), ("snapkv", {}),
                     ("refreshkv", {"threshold": None, "refresh_only": True})]
    assert [policies.label(*s) for s in specs] == ["full", "refreshkv:stride=5,pool=31", "snapkv", "refreshkv:refresh_only=true"]
    assert policies.parse_specs(policies.label("tokenselect", {"threshold": 0.75, "budget": 0.25})) == \
        [("tokenselect", {"threshold": 0.75, "budget": 0.25})]
    assert policies.build("refreshkv", {}, 800).budget == 100  # K = L/8 by default
    assert policies.build("snapkv", policies.parse_specs("snapkv:budget=0.25")[0][1], 800).budget == 200
    assert policies.build("tova", policies.parse_specs("tova:budget=64")[0][1], 800).budget == 64
    assert isinstance(policies.build("full", {}, 800), Policy)


@pytest.mark.parametrize("text, message", [
    ("nope", "unknown policy 'nope'"), ("snapkv:stride=5", "snapkv takes no knob 'stride'"),
    ("refreshkv:stride=x", "stride wants int, got 'x'"), ("pool=3", "before any policy"),
    ("refreshkv:stride", "needs a value"), ("refreshkv:budget=lots", "a number of tokens or a fraction"),
    ("refreshkv:refresh_only=maybe", "wants bool"), ("full:budget=8", "full takes no knob 'budget'")])
def test_parse_specs_names_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        policies.parse_specs(text)


@pytest.mark.parametrize("budget, message", [(0, "at least 1 token"), (1.5, r"fraction must lie in \(0, 1\]")])
def test_build_refuses_impossible_budgets(budget, message):
    with pytest.raises(ValueError, match=message):
        policies.build("refreshkv", {"budget": budget}, 100)


def test_knobs_of_a_subclass_that_forwards_kwargs():
    class Jittered(RefreshKV):
        def __init__(self, jitter: float = 0.5, **kwargs):
            super().__init__(**kwargs)
            self.jitter = jitter
    found = policies.knobs(Jittered)
    assert list(found) == ["jitter", "budget", "stride", "threshold", "refresh_only", "pool"]
    assert found["jitter"].annotation is float and found["stride"].default == 10


# ---- P1, P3: refreshkv with a full step at every step is full attention, bitwise ----

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


@pytest.mark.parametrize("threshold, refreshes", [(1.01, True), (-1.01, False)])
def test_refresh_only_with_the_similarity_schedule_checks_on_the_host(threshold, refreshes):
    """The ablation's check steps leave the graph: a drifted layer takes a score pass and refreshes."""
    case = dict(seed=3, n_layers=2, n_kv_heads=2, group=2, prompt_len=30, new=8)
    policy = RefreshKV(4, stride=1, threshold=threshold, refresh_only=True)
    run(case, policy)
    assert policy.stats()["full"] == (case["n_layers"] * (case["new"] - 1) if refreshes else 0)


# ---- P2: every policy with a budget covering everything is full attention ----

@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(case=cases, extra=st.integers(0, 20))
def test_budget_covering_everything_is_full_attention(name, case, extra):
    assert_full_attention(case, make(name, case["prompt_len"] + case["new"] + extra),
                          f"{name} with K >= L + T chose other tokens than full attention")


def assert_full_attention(case, policy, message=None):
    """The policy gives full attention's tokens, and its logits within float32 reordering."""
    tokens, logits = run(case, Policy())
    got_tokens, got_logits = run(case, policy)
    assert got_tokens == tokens, message
    torch.testing.assert_close(got_logits, logits, **FLOAT32)


@pytest.mark.parametrize("name", NAMES)
def test_budget_far_above_a_short_prompt_is_full_attention(name):
    """Fixed cases the property test rarely draws: K much larger than the prompt, so empty slots last."""
    case = dict(seed=3, n_layers=2, n_kv_heads=2, group=2, prompt_len=10, new=30)
    assert_full_attention(case, make(name, 64))


@pytest.mark.parametrize("name", NAMES)
def test_one_token_prompt(name):
    """A prompt of one token reaches the model as a decode step; generate() prefills the policy there."""
    case = dict(seed=5, n_layers=3, n_kv_heads=2, group=2, prompt_len=1, new=12)
    assert_full_attention(case, make(name, 16))


# ---- P4: right after a full step, the small cache is that step's top-K ----

class Recorded(RefreshKV):
    """RefreshKV that checks its small cache after every full step against an independent top-K."""

    def attend(self, layer, q, k, v, pos, q_raw):
        full_before = self.stats()["full"]
        out = super().attend(layer, q, k, v, pos, q_raw)
        if self.stats()["full"] > full_before:
            check_top_k(self.small[layer], q, k[:, :int(pos) + 1], self.budget, self.pool)
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
@given(cases, st.integers(1, 40), st.integers(1, 5), st.booleans())
def test_small_cache_after_full_step_is_top_k_of_pooled_scores(case, budget, stride, refresh_only):
    policy = Recorded(budget, stride=stride, refresh_only=refresh_only)
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


# ---- P5, P6: within budget plus declared extras; dropped positions never return ----

def record_selections(policy):
    """Wrap policy.run to record (T, idx) of every attention the policy runs (T = positions so far)."""
    seen, inner = [], policy.run

    def run(q, k, v, pos, idx=None, *args, **kwargs):
        seen.append((int(pos) + 1, None if idx is None else idx.clone()))
        return inner(q, k, v, pos, idx, *args, **kwargs)
    policy.run = run
    return seen


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(case=cases, budget=st.integers(5, 40))
def test_selections_keep_the_contract(name, case, budget):
    policy = make(name, budget)
    seen = record_selections(policy)
    run(case, policy)
    per_layer, budget = case["n_layers"], getattr(policy, "budget", None)
    dropped = {}  # (layer, KV head) -> positions gone for good
    for i, (T, idx) in enumerate(seen):
        layer = i % per_layer
        if idx is None:
            assert policy.full_steps, f"{name} attended to every position but does not declare full_steps"
            continue
        limit = budget + policy.extras(T)
        for h in range(idx.shape[0]):
            chosen = idx[h][idx[h] >= 0].tolist()  # entries < 0 are empty slots
            assert len(chosen) <= limit, f"{name} selects {len(chosen)} positions > budget {budget} + extras {limit - budget}"
            assert all(0 <= c < T - 1 for c in chosen), f"{name} selects a position outside the past 0..{T - 2}: {chosen}"
            assert len(set(chosen)) == len(chosen), f"{name} selects a position twice: {chosen}"
            if policy.evicts:
                gone = dropped.setdefault((layer, h), set())
                assert not set(chosen) & gone, f"{name} evicts but re-selected dropped positions {set(chosen) & gone}"
                gone |= set(range(T - 1)) - set(chosen)


# ---- P7: graph safety, checked on the CPU ----

def state_tensors(policy):
    """Every tensor the policy holds, in attributes and inside their dicts, lists and tuples, by name."""
    found = {}

    def walk(x, name):
        if isinstance(x, torch.Tensor):
            found[name] = x
        elif isinstance(x, dict):
            for key, v in x.items():
                walk(v, f"{name}[{key!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}[{i}]")
    for name, value in vars(policy).items():
        walk(value, name)
    return found


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(case=cases, budget=st.integers(5, 40))
def test_state_is_updated_in_place(name, case, budget):
    """P7, rule 3: the state made in prefill stays the same tensors through a generation."""
    policy = make(name, budget)
    gen = generate(*model_and_prompt(case), policy, case["new"] + 1)
    next(gen)  # after the prefill
    before = {key: (t, t.data_ptr()) for key, t in state_tensors(policy).items()}
    for _ in gen:
        pass
    after = state_tensors(policy)
    for key, (t, ptr) in before.items():
        assert key in after, f"{name}: policy.{key} made in prefill is gone after decoding"
        assert after[key] is t and t.data_ptr() == ptr, (
            f"{name}: policy.{key} was replaced by a new tensor while decoding; a captured CUDA graph keeps "
            f"using the old one. Update it in place (copy_, scatter_, index_copy_, +=)")
    new = sorted(set(after) - set(before))
    assert not new, f"{name}: policy.{new[0]} first made while decoding; make every state tensor in prefill"


class GraphRuleBroken(AssertionError):
    pass


HOST_READS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.item, torch.ops.aten.is_nonzero,
              torch.ops.aten.equal, torch.ops.aten.nonzero, torch.ops.aten.masked_select, torch.ops.aten.unique_dim,
              torch.ops.aten._unique2, torch.ops.aten.unique_consecutive}


IN_KERNEL = [False]  # decode_attention checks its inputs' values on CPU tensors only; not attend's doing


def kernel_checks_allowed(kernel):
    def attention(*args, **kwargs):
        IN_KERNEL[0] = True
        try:
            return kernel(*args, **kwargs)
        finally:
            IN_KERNEL[0] = False
    return attention


class NoHostReads(TorchDispatchMode):
    """Rule 1: rejects every op that reads a tensor's value on the host (or makes a shape from one)."""

    def __init__(self, name, where):
        super().__init__()
        self.name, self.where = name, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_) and \
            any(i is not None and i.dtype == torch.bool for i in args[1])  # x[mask]: a shape from the mask's values
        if (func.overloadpacket in HOST_READS or masks) and not IN_KERNEL[0]:
            raise GraphRuleBroken(
                f"{self.name}: rule 1 (no host sync) broken: attend ran {func} at {self.where()}, which reads a "
                f"tensor on the host (.item(), int(t), float(t), bool(t), `if t:`, .tolist(), or a data-dependent "
                f"shape: nonzero, boolean indexing). A CUDA graph replays the value read at capture. Keep it on "
                f"the device (torch.where, masks, fixed-size index tensors), or return None from plan(t) for "
                f"the steps that must decide on the host")
        return func(*args, **(kwargs or {}))


class CpuGraph:
    """A CUDA graph emulated on the CPU. capture() runs step() once, recording every aten op (a
    TorchDispatchMode), then puts back every tensor that run wrote to, as a real capture runs
    nothing; replay() runs the recorded ops again on the same tensors, writing each result into
    the tensor the capture made, and never runs the step's Python."""

    def __init__(self):
        self.ops = []

    def capture(self, step):
        recorder = Recorder(self.ops)
        check, kernels._check = kernels._check, lambda *args: None  # the step ran already: state is a step ahead
        try:
            with recorder:
                out = step()
        finally:
            kernels._check = check
        for t, before in reversed(recorder.written):
            t.copy_(before)
        return self, out

    def replay(self):
        for func, args, kwargs, outs in self.ops:
            for (made, fresh), new in zip(outs, tree_flatten(func(*args, **kwargs))[0]):
                if fresh:  # an op's own result, not a view or an in-place update of an input
                    made.copy_(new)


class Recorder(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.written = ops, []  # written: (tensor, its value before the capture wrote to it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for spec, a in zip(func._schema.arguments, args):
            if isinstance(a, torch.Tensor) and spec.alias_info is not None and spec.alias_info.is_write:
                self.written.append((a, a.clone()))
        result = func(*args, **kwargs)
        outs = tree_flatten(result)[0]
        if all(isinstance(x, torch.Tensor) for x in outs):  # (a host read returns a number: the kernel's checks)
            inputs = {x.untyped_storage().data_ptr() for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)}
            self.ops.append((func, args, kwargs, [(x, x.untyped_storage().data_ptr() not in inputs) for x in outs]))
        return result


def check_graph_safety(name, policy, fresh_policy, case):
    """Rules 1-3 of P7 for one generation: eager decoding with no host reads in attend on captured
    steps (plan not None) and the same selection shapes at every step of a plan; then the same
    generation with every plan's first step captured in a CpuGraph and replayed, token for token."""
    plan_of, shapes, step = {}, {}, [0]
    plan, attend, inner_run = policy.plan, policy.attend, policy.run

    def plan_wrapper(t):
        step[0] = t
        plan_of[t] = plan(t)
        return plan_of[t]

    def attend_wrapper(layer, q, k, v, pos, q_raw):
        if plan_of.get(step[0]) is None:  # the prefill's first token, or a step that runs without a graph
            return attend(layer, q, k, v, pos, q_raw)
        with NoHostReads(name, lambda: f"token {step[0]}, layer {layer}, plan {plan_of[step[0]]!r}"):
            return attend(layer, q, k, v, pos, q_raw)

    def run_wrapper(q, k, v, pos, idx=None, *args, **kwargs):
        p = plan_of.get(step[0])
        if p is not None:
            got = shapes.setdefault((p, step[0]), [])
            got.append(None if idx is None else tuple(idx.shape))
        return inner_run(q, k, v, pos, idx, *args, **kwargs)

    policy.plan, policy.attend, policy.run = plan_wrapper, attend_wrapper, run_wrapper
    kernel = policies.decode_attention
    policies.decode_attention = kernel_checks_allowed(kernel)
    try:
        tokens, logits = run(case, policy, graphs=False)
    finally:
        policies.decode_attention = kernel
    first = {}
    for (p, t), got in sorted(shapes.items(), key=lambda x: x[0][1]):
        t0, want = first.setdefault(p, (t, got))
        if got != want:
            raise GraphRuleBroken(
                f"{name}: rule 2 (fixed shapes) broken: plan {p!r} attended selections of shapes {got} at token "
                f"{t} but {want} at token {t0}; a CUDA graph replays the shapes of its capture. Keep a selection "
                f"of fixed size with empty slots (-1) instead of growing or shrinking one")
    captured = []
    real_capture = refreshkv.capture
    refreshkv.capture = lambda step_fn: captured.append(1) or CpuGraph().capture(step_fn)
    try:
        got_tokens, got_logits = run(case, fresh_policy, graphs={})
    finally:
        refreshkv.capture = real_capture
    differs = [i + 1 for i in range(len(tokens)) if i >= len(got_tokens) or not torch.equal(logits[i], got_logits[i])]
    if differs:
        raise GraphRuleBroken(
            f"{name}: rule 3 (no Python-side state) broken: replaying the captured steps gave other logits "
            f"than running attend from token {differs[0]} on. Replays skip attend's Python, so a counter, "
            f"flag, list or number kept in Python (or a value read once at capture) goes stale. Keep state "
            f"in tensors made in prefill and updated in place, and let plan(t) carry what differs by step")
    return captured


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(case=cases, budget=st.integers(5, 40))
def test_graph_safety(name, case, budget):
    """P7, rules 1-3, with every plan's first step captured in an emulated CUDA graph."""
    check_graph_safety(name, make(name, budget), make(name, budget), case)


GRAPH_CASE = dict(seed=7, n_layers=2, n_kv_heads=2, group=2, prompt_len=30, new=14)


def test_graph_check_allows_host_reads_on_steps_without_a_graph():
    """refresh-only's similarity check steps read the similarity on the host: plan None, never captured."""
    captured = check_graph_safety("refreshkv", RefreshKV(8, stride=3, threshold=0.9, refresh_only=True),
                                  RefreshKV(8, stride=3, threshold=0.9, refresh_only=True), GRAPH_CASE)
    assert len(captured) == 1  # the partial steps' graph; every third step runs from Python


def test_similarity_check_steps_replay_a_graph():
    """The similarity schedule's check steps decide per layer on the GPU: two graphs, no host reads."""
    captured = check_graph_safety("refreshkv", RefreshKV(8, stride=3, threshold=0.9),
                                  RefreshKV(8, stride=3, threshold=0.9), GRAPH_CASE)
    assert len(captured) == 2  # partial steps and check steps


class ItemInAttend(StreamingLLM):
    """Broken on purpose: the window's start read on the host."""

    def attend(self, layer, q, k, v, pos, q_raw):
        start = max(self.sinks, pos.item() - (self.budget - self.sinks))
        idx = torch.cat([torch.arange(self.sinks), torch.arange(start, start + self.budget - self.sinks)])
        return self.run(q, k, v, pos, positions(idx.masked_fill(idx >= pos, -1), self.n_kv))[0]


class GrowsFromPos(StreamingLLM):
    """Broken on purpose: a selection as long as the position (full attention, grown each step)."""

    def attend(self, layer, q, k, v, pos, q_raw):
        return self.run(q, k, v, pos, positions(torch.arange(int(pos)), self.n_kv))[0]


class GrowsInPython(StreamingLLM):
    """Broken on purpose: a selection grown by a Python counter (no host read)."""

    def attend(self, layer, q, k, v, pos, q_raw):
        self.steps = getattr(self, "steps", 0) + (layer == 0)
        return self.run(q, k, v, pos, positions(torch.arange(self.steps), self.n_kv))[0]


class CountsInPython(StreamingLLM):
    """Broken on purpose: the window's start from a Python step counter (fixed shape, stale on replay)."""

    def attend(self, layer, q, k, v, pos, q_raw):
        if layer == 0:
            self.steps = getattr(self, "steps", 0) + 1
        start = self.prompt_len - 1 + self.steps - (self.budget - self.sinks)
        idx = torch.cat([torch.arange(self.sinks), torch.arange(start, start + self.budget - self.sinks)])
        return self.run(q, k, v, pos, positions(idx, self.n_kv))[0]


@pytest.mark.parametrize("broken, rule", [(ItemInAttend, "rule 1 (no host sync)"), (GrowsFromPos, "rule 1 (no host sync)"),
                                          (GrowsInPython, "rule 2 (fixed shapes)"),
                                          (CountsInPython, "rule 3 (no Python-side state)")])
def test_graph_check_catches_each_broken_rule(broken, rule):
    with pytest.raises(GraphRuleBroken, match=rule.replace("(", r"\(").replace(")", r"\)")):
        check_graph_safety(broken.__name__, broken(8), broken(8), GRAPH_CASE)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_graph_replay_matches_running_each_step(name):
    model = tiny_model(0, 3, 2, 2).to(DEV)
    prompt = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    knobs = {"stride": 4} if name == "refreshkv" else {}
    eager = list(generate(model, prompt, make(name, 24, **knobs), 40, graphs=False))
    graphs = {}
    replayed = list(generate(model, prompt, make(name, 24, **knobs), 40, graphs=graphs))
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

    def attention(q, k, v, pos, idx=None, scores=False, kernel="auto", count=None, full=None):
        calls.append(None if idx is None else idx.clone())
        if count is not None:  # what the kernel counts (with full, the probabilities are a dense pass's)
            kernels.count_torch(count, k, pos, idx, full)
        return torch.zeros_like(q), probs_for(int(pos) + 1, None if full is not None else idx) if scores else None
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


def test_refreshkv_refresh_only_attends_to_the_refreshed_cache(monkeypatch):
    """The ablation's order on a full step: score pass, refresh, then attention to the refreshed small
    cache and the current token, which is attended once (its slot in the small cache left empty)."""
    monkeypatch.setattr(policies, "prompt_probs", lambda q, k: torch.full((2, 1, k.shape[1]), 0.1))
    p = RefreshKV(budget=4, stride=2, refresh_only=True)
    q, k, v, pos = qkv(21, N=30)
    p.prefill(0, q[:, None].expand(-1, 20, -1), k, q[:, None])
    p.small[0].copy_(torch.tensor([[0, 1, 2, 3]]))
    probs = torch.zeros(2, 30)
    probs[1, 20] = 1.0  # pooled: 17..20 on top; 20 is the current token
    calls = fake_attention(monkeypatch, lambda T, idx: probs)
    assert p.plan(2) == "full"
    p.attend(0, q, k, v, pos, q)
    assert calls[0] is None  # the score pass
    assert sorted(calls[1][0].tolist()) == [-1, 17, 18, 19]  # the refreshed cache, without the current token
    assert sorted(p.small[0][0].tolist()) == [17, 18, 19, 20] and p.stats()["full"] == 1


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
    assert p.plan(4) == "check"  # a check step decides on the GPU: a CUDA graph like any other
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
    columns = lambda q, k, kernel="auto", block=256: probs[:, :, :k.shape[1]].amax(0).sum(0)[None]  # group max, summed
    monkeypatch.setattr(policies, "column_scores", columns)
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
    probs[0, 4] = 0.9  # the current token scores highest: attended anyway, it takes no past position's slot
    p.attend(0, q, k, v, pos, q)
    assert sorted(calls[-1][0].tolist()) == [1, 2]


def test_knorm_keeps_the_smallest_key_norms_and_generated(monkeypatch):
    calls = fake_attention(monkeypatch, lambda T, idx: None)
    k = torch.ones(2, 12, 4)
    k[0, [1, 4, 7], :] = 0.1  # KV head 0: small keys at 1, 4, 7
    k[1, [0, 2, 9], :] = 0.2  # KV head 1: at 0, 2, 9
    p = POLICIES["knorm"](budget=3)
    q = torch.zeros(4, 4)
    p.prefill(0, q[:, None].expand(-1, 10, -1), k, None)  # a prompt of 10
    assert [sorted(r) for r in valid(p.kept[0])] == [[1, 4, 7], [0, 2, 9]]
    for T in (11, 12):  # tokens 10 and 11 are generated and kept
        p.attend(0, q, k, k, torch.tensor([T - 1]), q)
    assert [sorted(r) for r in valid(calls[-1])] == [[1, 4, 7, 10], [0, 2, 9, 10]]


def test_tokenselect_votes_per_head_and_reuses_while_the_query_is_similar():
    D, N = 4, 12
    k = torch.zeros(1, N, D)
    k[0, 3, 0] = k[0, 8, 1] = k[0, 5, 2] = 10.0
    q_a = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # head 0 points at 3, head 1 at 8
    q_b = torch.tensor([[0, 0, 1.0, 0], [0, 0, 1.0, 0]])  # both at 5
    p = POLICIES["tokenselect"](budget=2, threshold=0.9)
    p.prefill(0, q_a[:, None].expand(-1, 9, -1), k, q_a[:, None])
    seen = record_selections(p)
    p.attend(0, q_a, k, k, torch.tensor([9]), q_a)  # first step selects: one vote from each head
    assert sorted(seen[-1][1][0].tolist()) == [3, 8]
    p.attend(0, q_a, k, k, torch.tensor([10]), q_a)  # the same query: reuse; 9 joins instead of the lowest vote
    assert sorted(seen[-1][1][0].tolist()) in ([3, 9], [8, 9]) and p.stats()["reused_steps"] == 1
    p.attend(0, q_b, k, k, torch.tensor([11]), q_b)  # the query turned: select again, 5 first
    assert 5 in seen[-1][1][0].tolist() and p.stats()["reused_steps"] == 1
    p = POLICIES["tokenselect"](budget=2, threshold=-1.0)  # every query counts as similar, but the first step selects
    p.prefill(0, q_a[:, None].expand(-1, 9, -1), k, q_a[:, None])
    seen = record_selections(p)
    p.attend(0, q_a, k, k, torch.tensor([9]), q_a)
    assert sorted(seen[-1][1][0].tolist()) == [3, 8] and p.stats()["reused_steps"] == 0
    with pytest.raises(ValueError, match="threshold in"):
        POLICIES["tokenselect"](budget=2, threshold=float("nan"))
