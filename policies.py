"""KV-cache policies: which cached positions each layer's new query attends to.

The model keeps the full cache; a policy only holds positions (per layer and KV head) and is
called from model.py's attention:
    prefill(layer, q, k, q_raw)            q [H, L, D] the prompt's queries; k [Hkv, N, D] the cache, prompt at 0..L-1
    attend(layer, q, k, v, pos, q_raw)     q [H, D]; k, v [Hkv, N, D] the cache, filled up to pos -> out [H, D]
pos [1] is the current token's position, a tensor on the device; q_raw the query before rotary
embedding. Attention goes through self.run (the kernel plus counting): run(q, k, v, pos, idx)
attends to the positions idx [Hkv, n] (entries < 0 are empty slots) and to the current token.

A decode step is captured once in a CUDA graph and replayed at every position (refreshkv.py), so
attend keeps to three rules: no host syncs (never read a tensor's value on the host), fixed shapes
(an [Hkv, K] selection with empty slots, not a growing one), and state made in prefill and updated
in place (copy_, scatter_), and no Python-side state that a replay would skip (attend's Python runs
only when a plan is first met). What may differ between steps goes through plan(t), on the host.

To add a policy: write a class like the ones below and add its name to POLICIES. Its constructor's
annotated, defaulted parameters are its knobs (the command line, eval.py and bench.py read them);
its class attributes full_steps and evicts and its method extras() are the contract the tests hold
it to. POLICIES.md defines every policy and every property the tests check.
"""
import inspect
import math
import types
import typing

import torch
import torch.nn.functional as F

from kernels import column_scores, decode_attention, h2o_update, join, pooled_top, similarity_check


def group_max(probs, n_kv):
    """Per-query-head scores [H, n] -> per-KV-head scores [Hkv, n]: the max over each group."""
    return probs.view(n_kv, -1, probs.shape[-1]).amax(1)


def pool(scores, kernel=7):
    """1-D max-pool over positions (stride 1, same padding), so a strong position brings its neighbours."""
    return F.max_pool1d(scores[None], kernel, stride=1, padding=kernel // 2)[0]


def prompt_probs(q, k):
    """Causal softmax scores of the last w prompt queries over all prompt positions.
    q [H, w, D] (the queries of positions L-w..L-1), k [Hkv, L, D] -> [H, w, L] float32."""
    H, w, D = q.shape
    Hkv, L, _ = k.shape
    s = (q.view(Hkv, H // Hkv, w, D) @ k.transpose(1, 2)[:, None]).float() / math.sqrt(D)  # [Hkv, G, w, L]
    future = torch.arange(L, device=k.device) > torch.arange(L - w, L, device=k.device)[:, None]  # [w, L]
    return s.masked_fill(future, float("-inf")).softmax(-1).view(H, w, L)


def top(scores, k, last=None):
    """Per row, the k positions with the highest scores [Hkv, N] (only positions <= last, if given)
    -> (positions, scores) [Hkv, k]. Slots with no position left are empty: -1 and -inf."""
    if last is not None:
        scores = scores.masked_fill(torch.arange(scores.shape[1], device=scores.device) > last, float("-inf"))
    if k > scores.shape[1]:
        scores = F.pad(scores, (0, k - scores.shape[1]), value=float("-inf"))
    best = scores.topk(k, dim=-1, sorted=False)
    return best.indices.masked_fill(best.values == float("-inf"), -1), best.values


def drop_lowest(rank, *xs):
    """Per row, remove the entry of lowest rank from each x [Hkv, n] (the last entry fills its slot)."""
    out = rank.argmin(1, keepdim=True)
    return [x.scatter(1, out, x[:, -1:])[:, :-1] for x in xs]


def positions(idx, n_kv):
    """A 1-D list of positions, the same for every KV head -> [Hkv, n]."""
    return idx[None].expand(n_kv, -1)


def current(pos, n_kv):
    """The current token's position for every KV head -> [Hkv, 1]."""
    return pos.view(1, 1).expand(n_kv, 1)


class Policy:
    """The base class; by itself, full attention (see Full)."""

    kernel = "auto"  # decode_attention's kernel: "auto", "torch" or "triton"
    # The contract (POLICIES.md, "Properties"), checked for every registered policy:
    full_steps = False  # some steps may attend to every position (run with idx None)
    evicts = False  # a position dropped from the selection never comes back

    def extras(self, T):
        """How many positions beyond the budget a step may select, with T positions so far (the
        current token, always attended, not counted)."""
        return 0

    def prefill(self, layer, q, k, q_raw):
        self.n_kv, self.prompt_len = k.shape[0], q.shape[1]
        if layer == 0 or not hasattr(self, "count"):  # layer-steps, full ones, attended, dense, read besides
            self.count = torch.zeros(5, dtype=torch.long, device=k.device)  # positions summed over KV heads

    def plan(self, t):
        """Called on the host before the decode step that makes token t (t >= 2). Steps with the same
        plan run the same kernels and share one CUDA graph; None: run this step without one."""
        return "decode"

    def attend(self, layer, q, k, v, pos, q_raw):
        return self.run(q, k, v, pos)[0]

    def run(self, q, k, v, pos, idx=None, scores=False, extra=None, full=None):
        """The attention whose output the step uses, over idx [Hkv, n] (None: every position up to pos;
        with `full`, a device flag, every position where it is set), counted: the layer-step, whether it
        was full, positions attended (per KV head) and those a full step would read (the kernel counts
        these four), and reads besides (`extra`, e.g. page bounds). The counters live on the device, so
        graph replays count too."""
        if extra is not None:
            self.count[4:5] += self.n_kv * extra
        return decode_attention(q, k, v, pos, idx, scores, self.kernel, count=self.count[:4], full=full)

    def score_pass(self, q, k, v, pos):
        """An extra full pass for its scores alone [H, N]; it reads every position (a full step)."""
        self.count[1:2] += 1  # a full step, whose reads are besides what its token attends
        self.count[4:5] += self.n_kv * (pos + 1)
        return decode_attention(q, k, v, pos, None, True, self.kernel)[1]

    def stats(self):
        """The counters as numbers (a host sync: read them after generating)."""
        steps, full, attended, dense, besides = self.count.tolist()
        read = attended + besides
        return dict(steps=steps, full=full, attended=attended / self.n_kv, read=read / self.n_kv, dense=dense / self.n_kv)


class Full(Policy):
    """Full attention: every step attends to every position. The reference."""

    full_steps = True


class RefreshKV(Policy):
    """The paper: partial steps attend to a small cache of `budget` positions; a full step attends to
    everything and refreshes the small cache with the top-K of its scores. Full steps come every
    `stride` steps, or, with `threshold`, at every stride-th step where the query has drifted.
    refresh_only: the paper's ablation; a full step's token attends to the refreshed small cache."""

    full_steps = True

    def __init__(self, budget: int, stride: int = 10, threshold: float | None = None, refresh_only: bool = False,
                 pool: int = 7):
        if budget < 1 or stride < 1 or pool < 1 or pool % 2 == 0:
            raise ValueError(f"refreshkv needs budget >= 1, stride >= 1 and an odd pool >= 1 (got {budget}, {stride}, {pool})")
        self.budget, self.stride, self.threshold, self.refresh_only = budget, stride, threshold, refresh_only
        self.pool = pool  # max-pool kernel over positions (7 in the paper, for BPE tokens)
        self.small, self.rank, self.q_mean = {}, {}, {}  # per layer: positions [Hkv, K], their rank, mean query
        self.step = "partial"  # set by plan() before each step: "partial", "full" or "check"

    def refresh(self, layer, probs, q_raw, last=None, flag=None):
        """The small cache becomes the top-K positions of this step's aggregated, pooled scores
        (kernels.pooled_top: no sort on the GPU), and the mean query is kept for the similarity
        schedule. With flag (a check step's, a device tensor): the small cache only where it is set;
        the check made the mean query already."""
        pooled_top(probs, self.n_kv, self.pool, self.budget, last, out=(self.small[layer], self.rank[layer]),
                   flag=flag, kernel=self.kernel)
        if flag is None:
            self.q_mean[layer].copy_(q_raw.float().mean(0))

    def prefill(self, layer, q, k, q_raw):
        super().prefill(layer, q, k, q_raw)
        self.small[layer] = torch.empty(self.n_kv, self.budget, dtype=torch.long, device=k.device)
        self.rank[layer] = torch.empty(self.n_kv, self.budget, device=k.device)
        self.q_mean[layer] = torch.empty(q.shape[-1], device=k.device)
        self.refresh(layer, prompt_probs(q[:, -1:], k[:, :self.prompt_len])[:, 0], q_raw[:, -1])

    def plan(self, t):
        # every stride-th step is a full step, or with a threshold a check step (full where the query drifted)
        self.step = "partial" if t % self.stride else "full" if self.threshold is None else "check"
        return None if self.step == "check" and self.refresh_only else self.step  # the ablation checks on the host

    def attend(self, layer, q, k, v, pos, q_raw):
        if self.step == "check" and not self.refresh_only:
            return self.check_step(layer, q, k, v, pos, q_raw)
        drifted = lambda: F.cosine_similarity(q_raw.float().mean(0), self.q_mean[layer], dim=0).item() < self.threshold
        if self.step == "partial" or (self.step == "check" and not drifted()):
            out = self.run(q, k, v, pos, self.small[layer])[0]
            self.join(layer, pos)
            return out
        if not self.refresh_only:  # a full step
            out, probs = self.run(q, k, v, pos, None, scores=True)
            self.refresh(layer, probs, q_raw, pos)
            return out
        # The ablation: a score pass, the refresh, then attention to the refreshed small cache;
        # the current token, attended anyway, leaves its slot empty for this step.
        self.refresh(layer, self.score_pass(q, k, v, pos), q_raw, pos)
        small = self.small[layer]
        return self.run(q, k, v, pos, small.masked_fill(small == pos, -1))[0]

    def join(self, layer, pos, flag=None):
        """The current token joins and the lowest-ranked member leaves (an empty slot first; between
        equal ranks, the first). A joined token's rank is 1 + its position: above any score, and the
        oldest joined token ranks lowest. With flag (a device tensor): only where it is not set.
        (kernels.join: one launch on the GPU.)"""
        join(self.small[layer], self.rank[layer], pos, flag, self.kernel)

    def check_step(self, layer, q, k, v, pos, q_raw):
        """A similarity check decided on the GPU, so that the step replays a CUDA graph like any other:
        where the layer's mean query has drifted (cosine below threshold) the kernel attends to every
        position and the small cache is refreshed; elsewhere the step is partial (masked updates).
        kernels.similarity_check makes the flag and, where it is set, the new mean query (one launch)."""
        flag = similarity_check(q_raw, self.q_mean[layer], self.threshold, self.kernel)
        out, probs = self.run(q, k, v, pos, self.small[layer], scores=True, full=flag)
        self.join(layer, pos, flag)
        self.refresh(layer, probs, q_raw, pos, flag)
        return out


class StreamingLLM(Policy):
    """Attention sinks: the first `sinks` positions and the most recent budget - sinks ones."""

    evicts = True

    def __init__(self, budget: int, sinks: int = 4):
        if not 0 <= sinks < budget:
            raise ValueError(f"streamingllm needs 0 <= sinks < budget (got sinks {sinks}, budget {budget})")
        self.budget, self.sinks = budget, sinks

    def attend(self, layer, q, k, v, pos, q_raw):
        slot = torch.arange(self.budget, device=k.device)
        idx = torch.where(slot < self.sinks, slot, pos - self.budget + slot)  # sinks, then the window before pos
        empty = (idx >= pos) | ((slot >= self.sinks) & (idx < self.sinks))  # not yet there, or a sink already
        return self.run(q, k, v, pos, positions(idx.masked_fill(empty, -1), self.n_kv))[0]


class SnapKV(Policy):
    """At the end of prefill the last `window` queries vote for prompt positions; the top budget - window
    of them and the window itself are kept for good. Every generated token is kept too, in slots
    made at prefill for the whole cache (the kernel skips the empty ones, but walks their indices)."""

    evicts = True

    def __init__(self, budget: int, window: int = 1, pool: int = 7):
        if not 1 <= window < budget:
            raise ValueError(f"snapkv needs 1 <= window < budget (got window {window}, budget {budget})")
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"snapkv needs an odd pool >= 1 (got {pool})")
        self.budget, self.window, self.pool = budget, window, pool
        self.kept = {}  # per layer: [Hkv, budget + room for every generated token]

    def extras(self, T):
        return T - 1 - self.prompt_len  # the generated tokens

    def prefill(self, layer, q, k, q_raw):
        super().prefill(layer, q, k, q_raw)
        Hkv, L = self.n_kv, self.prompt_len
        w = min(self.window, L - 1)  # at least one prompt position gets a vote
        votes = pool(group_max(prompt_probs(q[:, L - w:], k[:, :L]).sum(1)[:, :L - w], Hkv), self.pool)  # [Hkv, L - w]
        voted = top(votes, self.budget - w)[0]
        window = positions(torch.arange(L - w, L, device=k.device), Hkv)
        generated = torch.full((Hkv, k.shape[1] - L), -1, device=k.device)  # empty until each token comes
        self.kept[layer] = torch.cat([voted, window, generated], 1)

    def attend(self, layer, q, k, v, pos, q_raw):
        out = self.run(q, k, v, pos, self.kept[layer])[0]
        # the current token takes its own slot among the generated ones
        self.kept[layer].index_copy_(1, pos - self.prompt_len + self.budget, current(pos, self.n_kv))
        return out


class H2O(Policy):
    """Heavy hitters: each position accumulates the scores it receives from every query. Keep the
    budget/2 most recent positions and the rest of the budget with the largest accumulated score."""

    evicts = True

    def __init__(self, budget: int, block: int = 256):
        if budget < 2:
            raise ValueError(f"h2o needs budget >= 2 (got {budget})")
        self.budget, self.block = budget, block
        self.kept, self.acc = {}, {}  # per layer: positions [Hkv, K] and their accumulated scores

    def prefill(self, layer, q, k, q_raw):
        super().prefill(layer, q, k, q_raw)
        Hkv, L = self.n_kv, self.prompt_len
        acc = column_scores(q, k[:, :L], self.kernel, self.block)  # each query's group max, summed; no L x L matrix
        recent = min(self.budget // 2, L)
        heavy = top(acc[:, :L - recent], self.budget - recent)[0]
        kept = torch.cat([heavy, positions(torch.arange(L - recent, L, device=k.device), Hkv)], 1)
        self.kept[layer] = kept
        self.acc[layer] = acc.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, float("-inf"))

    def attend(self, layer, q, k, v, pos, q_raw):
        out, probs = self.run(q, k, v, pos, self.kept[layer], scores=True)
        # Each member's score grows by the group's max probability; the current token joins, taking
        # the slot of the non-recent member with the smallest score (an empty slot first).
        h2o_update(probs, self.kept[layer], self.acc[layer], pos, self.budget // 2, self.kernel)
        return out


class TOVA(Policy):
    """Token omission via attention: keep the budget positions the current query scores highest
    (mean over all the layer's heads); each step the lowest one leaves for good."""

    evicts = True

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"tova needs budget >= 1 (got {budget})")
        self.budget = budget
        self.kept = {}  # per layer: positions [Hkv, K], the same for every KV head

    def prefill(self, layer, q, k, q_raw):
        super().prefill(layer, q, k, q_raw)
        scores = prompt_probs(q[:, -1:], k[:, :self.prompt_len])[:, 0].mean(0)  # [L]
        self.kept[layer] = top(scores[None], self.budget)[0].repeat(self.n_kv, 1)

    def attend(self, layer, q, k, v, pos, q_raw):
        out, probs = self.run(q, k, v, pos, self.kept[layer], scores=True)
        kept = torch.cat([self.kept[layer], current(pos, self.n_kv)], 1)
        score = probs.mean(0).masked_fill(kept[0] < 0, -1.0)  # [K + 1]; an empty slot goes first
        self.kept[layer].copy_(drop_lowest(positions(score, self.n_kv), kept)[0])
        return out


class Quest(Policy):
    """Query-aware page selection, no eviction: pages of `page_size` positions keep the per-channel
    min and max of their keys; the query attends to the pages whose score bound is highest, always
    including the newest page. The first two layers attend densely."""

    full_steps = True  # the first two layers

    def __init__(self, budget: int, page_size: int = 16):
        if budget < 1 or page_size < 1:
            raise ValueError(f"quest needs budget >= 1 and page size >= 1 (got {budget}, {page_size})")
        self.budget, self.pages, self.page_size = budget, math.ceil(budget / page_size), page_size
        self.kmin, self.kmax = {}, {}  # per layer: [Hkv, pages of the whole cache, D]

    def extras(self, T):
        return self.pages * self.page_size - self.budget  # whole pages

    def prefill(self, layer, q, k, q_raw):
        super().prefill(layer, q, k, q_raw)
        if layer < 2:
            return
        (Hkv, N, D), L, P = k.shape, self.prompt_len, self.page_size
        kp = F.pad(k[:, :L], (0, 0, 0, -L % P)).view(Hkv, -1, P, D)
        filled = torch.arange(kp.shape[1] * P, device=k.device).view(-1, P)[:, :, None] < L  # [pages, P, 1]
        self.kmin[layer] = torch.zeros(Hkv, math.ceil(N / P), D, dtype=k.dtype, device=k.device)
        self.kmax[layer] = torch.zeros_like(self.kmin[layer])
        self.kmin[layer][:, :kp.shape[1]] = kp.masked_fill(~filled, float("inf")).amin(2)
        self.kmax[layer][:, :kp.shape[1]] = kp.masked_fill(~filled, float("-inf")).amax(2)

    def attend(self, layer, q, k, v, pos, q_raw):
        if layer < 2:
            return self.run(q, k, v, pos)[0]
        (Hkv, _, D), P = k.shape, self.page_size
        kmin, kmax, page = self.kmin[layer], self.kmax[layer], pos // P
        # The current token's key enters its page's bounds (a new page starts from it).
        key, first = k.index_select(1, pos), pos % P == 0  # [Hkv, 1, D]
        kmin.index_copy_(1, page, torch.where(first, key, torch.minimum(kmin.index_select(1, page), key)))
        kmax.index_copy_(1, page, torch.where(first, key, torch.maximum(kmax.index_select(1, page), key)))
        # Upper bound of q.k over a page: sum_d max(q_d min_d, q_d max_d), then the max over the group.
        qg = q.view(Hkv, -1, D)
        bound = (qg.clamp(min=0) @ kmax.transpose(1, 2) + qg.clamp(max=0) @ kmin.transpose(1, 2)).float().amax(1)
        p = torch.arange(bound.shape[1], device=k.device)
        bound = bound.masked_fill(p > page, float("-inf")).masked_fill(p == page, float("inf"))  # newest page always
        best = bound.topk(min(self.pages, bound.shape[1]), dim=-1, sorted=False)  # [Hkv, pages]
        idx = best.indices[:, :, None] * P + torch.arange(P, device=k.device)  # [Hkv, pages, P]
        idx = idx.masked_fill((best.values[:, :, None] == float("-inf")) | (idx >= pos), -1).flatten(1)
        # min and max of each page so far: as many bytes as one position's key and value
        return self.run(q, k, v, pos, idx, extra=page + 1)[0]


class Oracle(Policy):
    """The best K positions for each step: a full pass for the scores, then attention to their top-K.
    As costly as full attention; an upper bound for any K-token selection."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"oracle needs budget >= 1 (got {budget})")
        self.budget = budget

    def attend(self, layer, q, k, v, pos, q_raw):
        scores = group_max(self.score_pass(q, k, v, pos), self.n_kv)
        idx = top(scores, self.budget, pos - 1)[0]  # past positions only
        return self.run(q, k, v, pos, idx)[0]


class KNorm(Policy):
    """KnormPress (kvpress): keep the `budget` prompt positions whose keys have the smallest L2 norm,
    per KV head, and every generated token. Scores need no query: prefill looks at the keys alone."""

    evicts = True

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"knorm needs budget >= 1 (got {budget})")
        self.budget = budget
        self.kept = {}  # per layer: [Hkv, budget + room for every generated token]

    def extras(self, T):
        return T - 1 - self.prompt_len  # the generated tokens

    def prefill(self, layer, q, k, q_raw):
        super().prefill(layer, q, k, q_raw)
        L = self.prompt_len
        smallest = top(-k[:, :L].float().norm(dim=-1), self.budget)[0]  # [Hkv, K]
        generated = torch.full((self.n_kv, k.shape[1] - L), -1, device=k.device)  # empty until each token comes
        self.kept[layer] = torch.cat([smallest, generated], 1)

    def attend(self, layer, q, k, v, pos, q_raw):
        out = self.run(q, k, v, pos, self.kept[layer])[0]
        self.kept[layer].index_copy_(1, pos - self.prompt_len + self.budget, current(pos, self.n_kv))
        return out


class TokenSelect(Policy):
    """Dynamic token selection (Wu et al. 2024): each step, every query head scores every past
    position by q.k; a soft vote (each head's softmax, summed over the layer's heads) picks the
    top-K positions, for all KV heads. While the query stays similar to the previous step's
    (cosine above `threshold`), the last selection is kept and the previous token joins it."""

    def __init__(self, budget: int, threshold: float = 0.9):
        if budget < 1 or not -1 <= threshold <= 1:
            raise ValueError(f"tokenselect needs budget >= 1 and a threshold in [-1, 1] (got {budget}, {threshold})")
        self.budget, self.threshold = budget, threshold
        self.chosen, self.vote, self.q_last = {}, {}, {}  # per layer: positions [1, K], their votes, last query

    def prefill(self, layer, q, k, q_raw):
        super().prefill(layer, q, k, q_raw)
        if layer == 0:
            self.reused = torch.zeros((), dtype=torch.long, device=k.device)  # layer-steps that kept their selection
        self.chosen[layer] = torch.full((1, self.budget), -1, device=k.device)
        self.vote[layer] = torch.full((1, self.budget), float("-inf"), device=k.device)
        self.q_last[layer] = torch.full((q_raw[:, -1].numel(),), float("nan"), device=k.device)  # never similar: the first step selects

    def attend(self, layer, q, k, v, pos, q_raw):
        (Hkv, N, D), H = k.shape, q.shape[0]
        s = (q.view(Hkv, -1, D) @ k.transpose(1, 2)).float() / math.sqrt(D)  # [Hkv, G, N]
        s = s.masked_fill(torch.arange(N, device=k.device) >= pos, float("-inf"))  # past positions only
        fresh, fresh_vote = top(s.softmax(-1).sum((0, 1))[None], self.budget, pos - 1)  # [1, K]
        # Reuse: the previous token joins the kept selection in place of its lowest-voted member
        # (an empty slot first); a joined token's vote, H + 1 + its position, outranks any vote.
        chosen, vote, slot = self.chosen[layer], self.vote[layer], self.vote[layer].argmin(1, keepdim=True)
        joined = (pos - 1).view(1, 1)
        kept, kept_vote = chosen.scatter(1, slot, joined), vote.scatter(1, slot, H + 1.0 + joined.float())
        q_now = q_raw.float().flatten()
        similar = F.cosine_similarity(q_now, self.q_last[layer], dim=0) > self.threshold
        chosen.copy_(torch.where(similar, kept, fresh))
        vote.copy_(torch.where(similar, kept_vote, fresh_vote))
        self.q_last[layer].copy_(q_now)
        self.reused += similar
        # the vote read every past key: half of what attending to those positions reads
        return self.run(q, k, v, pos, positions(chosen[0], self.n_kv), extra=(pos + 1) // 2)[0]

    def stats(self):
        return dict(super().stats(), reused_steps=int(self.reused))


POLICIES = {"full": Full, "refreshkv": RefreshKV, "streamingllm": StreamingLLM, "snapkv": SnapKV,
            "h2o": H2O, "tova": TOVA, "quest": Quest, "oracle": Oracle, "knorm": KNorm, "tokenselect": TokenSelect}


# ---- The registry: policies by name, their knobs read from the constructors ----

DEFAULT_BUDGET = 0.125  # K = L/8, the paper's


def knobs(cls):
    """A policy's knobs {name: inspect.Parameter, annotation resolved}: its constructor's parameters,
    and, where the constructor forwards **kwargs, those of the classes it inherits from."""
    found = {}
    for c in cls.__mro__:
        if c is object:
            break
        if "__init__" not in vars(c):
            continue
        hints = typing.get_type_hints(c.__init__)
        params = list(inspect.signature(c.__init__).parameters.values())[1:]  # without self
        for p in params:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, p.replace(annotation=hints.get(p.name, str)))
        if all(p.kind is not p.VAR_KEYWORD for p in params):
            break
    return found


def policy_class(name):
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    return POLICIES[name]


def convert(name, knob, text):
    """The text of a knob's value -> its value, by the constructor's annotation (int, float, bool,
    str, or one of them | None). A budget is tokens ("256") or a fraction of the prompt ("0.125")."""
    kind = knobs(policy_class(name))[knob].annotation
    if knob == "budget":
        kind = float if "." in text or "e" in text.lower() else int
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        what = "a number of tokens or a fraction" if knob == "budget" else getattr(kind, "__name__", kind)
        raise ValueError(f"{name} knob {knob} wants {what}, got {text!r}") from None


def parse_specs(text):
    """'full,refreshkv:stride=5,pool=31,snapkv' -> [('full', {}), ('refreshkv', {'stride': 5, 'pool': 31}),
    ('snapkv', {})]. A piece with '=' and no ':' is one more knob of the policy before it."""
    specs = []
    for piece in text.split(","):
        piece = piece.strip()
        if "=" in piece and ":" not in piece:
            if not specs:
                raise ValueError(f"knob {piece!r} comes before any policy name")
            name, setting = specs[-1][0], piece
        else:
            name, _, setting = piece.partition(":")
            policy_class(name)
            specs.append((name, {}))
        if setting:
            knob, eq, value = setting.partition("=")
            knob = knob.strip().replace("-", "_")
            if not eq:
                raise ValueError(f"{name} knob {knob!r} needs a value (knob=value)")
            if knob not in knobs(POLICIES[name]):
                raise ValueError(f"policy {name} takes no knob {knob!r} (its knobs: {', '.join(knobs(POLICIES[name])) or 'none'})")
            specs[-1][1][knob] = convert(name, knob, value.strip())
    return specs


def budget_tokens(budget, prompt_len):
    """A budget in tokens (int >= 1) or as a fraction of the prompt (float in (0, 1]) -> tokens."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"a budget fraction must lie in (0, 1], got {budget}")
        return max(1, int(budget * prompt_len))
    if budget < 1:
        raise ValueError(f"budget must be at least 1 token, got {budget}")
    return budget


def build(name, knobs_given, prompt_len):
    """The policy `name` with these knobs (values as parse_specs gives them) for a prompt of
    prompt_len tokens; the budget defaults to DEFAULT_BUDGET of the prompt."""
    params = knobs(policy_class(name))
    for knob in knobs_given:
        if knob not in params:
            raise ValueError(f"policy {name} takes no knob {knob!r} (its knobs: {', '.join(params) or 'none'})")
    given = dict(knobs_given)
    if "budget" in params:
        given["budget"] = budget_tokens(given.get("budget", DEFAULT_BUDGET), prompt_len)
    missing = [k for k, p in params.items() if p.default is p.empty and k not in given]
    if missing:
        raise ValueError(f"policy {name} needs knob {missing[0]!r}")
    return POLICIES[name](**given)


def label(name, knobs_given):
    """'refreshkv:stride=5,pool=31': the knobs that differ from their defaults, as parse_specs reads them."""
    params = knobs(policy_class(name))
    default = lambda k: DEFAULT_BUDGET if k == "budget" else params[k].default
    text = lambda v: str(v).lower() if isinstance(v, bool) or v is None else str(v)
    shown = [f"{k}={text(v)}" for k, v in knobs_given.items() if v != default(k)]
    return name + (":" + ",".join(shown) if shown else "")
