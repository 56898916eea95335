"""KV-cache policies: which cached positions each layer's new query attends to.

The model keeps the full cache; a policy only holds positions (per layer and KV head) and is
called from model.py's attention:
    prefill(layer, q, k, q_raw)       q [H, L, D] and k [Hkv, L, D] of the prompt
    attend(layer, q, k, v, q_raw)     q [H, D]; k, v [Hkv, T, D], the current token at T-1 -> out [H, D]
q_raw is the query before rotary embedding. Attention goes through self.run (the kernel plus
bookkeeping): run(q, k, v, idx) attends to the positions idx [Hkv, n] and to the current token.
To add a policy: write a class like the ones below and add its name to POLICIES.
Each class docstring says what the policy keeps; the README has the table and the papers.
"""
import math

import torch
import torch.nn.functional as F

from kernels import decode_attention


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


def drop_lowest(rank, *xs):
    """Per KV head, remove the entry of lowest rank from each x [Hkv, n] (the last entry fills its slot)."""
    out = rank.argmin(1, keepdim=True)
    return [x.scatter(1, out, x[:, -1:])[:, :-1] for x in xs]


def positions(idx, n_kv):
    """A 1-D list of positions, the same for every KV head -> [Hkv, n]."""
    return idx[None].expand(n_kv, -1)


def current(k):
    """The current token's position (T-1) for every KV head -> [Hkv, 1]."""
    return torch.full((k.shape[0], 1), k.shape[1] - 1, device=k.device)


class Policy:
    """Full attention: every step attends to every position. The reference, and the base class."""

    kernel = "auto"  # decode_attention's kernel: "auto", "torch" or "triton"

    def __init__(self):
        # Summed over layer-steps: steps, full steps (read every position), positions attended,
        # positions read (a position's key and value), positions a full step would read.
        self.steps = self.full = self.attended = self.read = self.dense = 0

    def prefill(self, layer, q, k, q_raw):
        pass

    def attend(self, layer, q, k, v, q_raw):
        return self.run(q, k, v)[0]

    def run(self, q, k, v, idx=None, scores=False):
        """The attention whose output the step uses, over idx [Hkv, n] (None: every position), counted."""
        T = k.shape[1]
        n = T if idx is None else idx.shape[1] + 1
        self.steps, self.full, self.attended = self.steps + 1, self.full + (idx is None), self.attended + n
        self.read, self.dense = self.read + n, self.dense + T
        return decode_attention(q, k, v, idx, scores, self.kernel)

    def score_pass(self, q, k, v):
        """An extra full pass for its scores alone [H, T]; it reads every position (a full step)."""
        self.read, self.full = self.read + k.shape[1], self.full + 1
        return decode_attention(q, k, v, None, True, self.kernel)[1]


class RefreshKV(Policy):
    """The paper: partial steps attend to a small cache of `budget` positions; a full step attends to
    everything and refreshes the small cache with the top-K of its scores. Full steps come every
    `stride` steps, or, with `threshold`, at every stride-th step where the query has drifted."""

    def __init__(self, budget, stride=10, threshold=None, refresh_only=False, pool=7):
        super().__init__()
        if budget < 1 or stride < 1 or pool < 1 or pool % 2 == 0:
            raise ValueError(f"refreshkv needs budget >= 1, stride >= 1 and an odd pool >= 1 (got {budget}, {stride}, {pool})")
        self.budget, self.stride, self.threshold, self.refresh_only = budget, stride, threshold, refresh_only
        self.pool = pool  # max-pool kernel over positions (7 in the paper, for BPE tokens)
        self.small, self.rank, self.q_mean = {}, {}, {}  # per layer: positions [Hkv, m], their rank, mean query

    def refresh(self, layer, probs, q_raw):
        """The small cache becomes the top-K positions of this step's aggregated, pooled scores."""
        scores = pool(group_max(probs, self.n_kv), self.pool)  # [Hkv, T]
        top = scores.topk(min(self.budget, scores.shape[1]), dim=-1)
        self.small[layer], self.rank[layer] = top.indices, top.values
        self.q_mean[layer] = q_raw.float().mean(0)  # [D], for the similarity schedule

    def prefill(self, layer, q, k, q_raw):
        self.n_kv, self.prompt_len = k.shape[0], k.shape[1]
        self.refresh(layer, prompt_probs(q[:, -1:], k)[:, 0], q_raw[:, -1])

    def full_step(self, layer, t, q_raw):
        if t % self.stride:
            return False
        if self.threshold is None:
            return True
        return F.cosine_similarity(q_raw.float().mean(0), self.q_mean[layer], dim=0).item() < self.threshold

    def attend(self, layer, q, k, v, q_raw):
        T = k.shape[1]
        t = T - self.prompt_len + 1  # this step generates token t (token 1 came from the prefill)
        if self.full_step(layer, t, q_raw):
            if self.refresh_only:  # the ablation: partial attention for the token, full scores for the refresh
                probs = self.score_pass(q, k, v)
                out = self.run(q, k, v, self.small[layer])[0]
            else:
                out, probs = self.run(q, k, v, None, scores=True)
            self.refresh(layer, probs, q_raw)
            return out
        out = self.run(q, k, v, self.small[layer])[0]
        # The current token joins; past K members, the lowest-scored one leaves. A joined token's
        # rank is 1 + its position: above any score, and the oldest joined token ranks lowest.
        new = current(k)
        small = torch.cat([self.small[layer], new], 1)
        rank = torch.cat([self.rank[layer], 1.0 + new.to(self.rank[layer].dtype)], 1)
        if small.shape[1] > self.budget:
            small, rank = drop_lowest(rank, small, rank)
        self.small[layer], self.rank[layer] = small, rank
        return out


class StreamingLLM(Policy):
    """Attention sinks: the first `sinks` positions and the most recent budget - sinks ones."""

    def __init__(self, budget, sinks=4):
        super().__init__()
        if not 0 <= sinks < budget:
            raise ValueError(f"streamingllm needs 0 <= sinks < budget (got sinks {sinks}, budget {budget})")
        self.budget, self.sinks = budget, sinks

    def attend(self, layer, q, k, v, q_raw):
        n = k.shape[1] - 1  # past positions
        window = max(self.sinks, n - (self.budget - self.sinks))
        idx = torch.cat([torch.arange(min(self.sinks, n), device=k.device), torch.arange(window, n, device=k.device)])
        return self.run(q, k, v, positions(idx, k.shape[0]))[0]


class SnapKV(Policy):
    """At the end of prefill the last `window` queries vote for prompt positions; the top budget - window
    of them and the window itself are kept for good. Every generated token is kept too."""

    def __init__(self, budget, window=1, pool=7):
        super().__init__()
        if not 1 <= window < budget:
            raise ValueError(f"snapkv needs 1 <= window < budget (got window {window}, budget {budget})")
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"snapkv needs an odd pool >= 1 (got {pool})")
        self.budget, self.window, self.pool = budget, window, pool
        self.kept = {}  # per layer: prompt positions [Hkv, n]

    def prefill(self, layer, q, k, q_raw):
        Hkv, L, _ = k.shape
        w = min(self.window, L - 1)  # at least one prompt position gets a vote
        votes = pool(group_max(prompt_probs(q[:, L - w:], k).sum(1)[:, :L - w], Hkv), self.pool)  # [Hkv, L - w]
        top = votes.topk(min(self.budget - w, L - w), dim=-1).indices
        self.kept[layer] = torch.cat([top, positions(torch.arange(L - w, L, device=k.device), Hkv)], 1)
        self.prompt_len = L

    def attend(self, layer, q, k, v, q_raw):
        generated = torch.arange(self.prompt_len, k.shape[1] - 1, device=k.device)
        return self.run(q, k, v, torch.cat([self.kept[layer], positions(generated, k.shape[0])], 1))[0]


class H2O(Policy):
    """Heavy hitters: each position accumulates the scores it receives from every query. Keep the
    budget/2 most recent positions and the rest of the budget with the largest accumulated score."""

    def __init__(self, budget, block=256):
        super().__init__()
        if budget < 2:
            raise ValueError(f"h2o needs budget >= 2 (got {budget})")
        self.budget, self.block = budget, block
        self.kept, self.acc = {}, {}  # per layer: positions [Hkv, n] and their accumulated scores

    def prefill(self, layer, q, k, q_raw):
        Hkv, L, _ = k.shape
        acc = torch.zeros(Hkv, L, device=k.device)
        for e in range(L, 0, -self.block):  # queries in blocks, never an L x L matrix
            p = prompt_probs(q[:, max(0, e - self.block):e], k[:, :e])  # [H, b, e]
            acc[:, :e] += p.view(Hkv, -1, *p.shape[1:]).amax(1).sum(1)  # each query's group max, summed
        recent = min(self.budget // 2, L)
        heavy = acc[:, :L - recent].topk(min(self.budget - recent, L - recent), dim=-1).indices
        self.kept[layer] = torch.cat([heavy, positions(torch.arange(L - recent, L, device=k.device), Hkv)], 1)
        self.acc[layer] = acc.gather(1, self.kept[layer])

    def attend(self, layer, q, k, v, q_raw):
        T = k.shape[1]
        out, probs = self.run(q, k, v, self.kept[layer], scores=True)
        got = group_max(probs, k.shape[0])  # [Hkv, n + 1], the current token last
        kept = torch.cat([self.kept[layer], current(k)], 1)
        acc = torch.cat([self.acc[layer], torch.zeros_like(got[:, :1])], 1) + got
        if kept.shape[1] > self.budget:  # the non-recent position with the smallest score leaves
            recent = kept > T - 1 - self.budget // 2
            kept, acc = drop_lowest(acc.masked_fill(recent, float("inf")), kept, acc)
        self.kept[layer], self.acc[layer] = kept, acc
        return out


class TOVA(Policy):
    """Token omission via attention: keep the budget positions the current query scores highest
    (mean over all the layer's heads); each step the lowest one leaves for good."""

    def __init__(self, budget):
        super().__init__()
        if budget < 1:
            raise ValueError(f"tova needs budget >= 1 (got {budget})")
        self.budget = budget
        self.kept = {}  # per layer: positions [Hkv, n], the same for every KV head

    def prefill(self, layer, q, k, q_raw):
        scores = prompt_probs(q[:, -1:], k)[:, 0].mean(0)  # [L]
        self.kept[layer] = positions(scores.topk(min(self.budget, k.shape[1])).indices, k.shape[0])

    def attend(self, layer, q, k, v, q_raw):
        out, probs = self.run(q, k, v, self.kept[layer], scores=True)
        kept = torch.cat([self.kept[layer], current(k)], 1)
        if kept.shape[1] > self.budget:
            kept, = drop_lowest(positions(probs.mean(0), k.shape[0]), kept)
        self.kept[layer] = kept
        return out


class Quest(Policy):
    """Query-aware page selection, no eviction: pages of `page_size` positions keep the per-channel
    min and max of their keys; the query attends to the pages whose score bound is highest, always
    including the newest page. The first two layers attend densely."""

    def __init__(self, budget, page_size=16):
        super().__init__()
        if budget < 1 or page_size < 1:
            raise ValueError(f"quest needs budget >= 1 and page size >= 1 (got {budget}, {page_size})")
        self.pages, self.page_size = math.ceil(budget / page_size), page_size
        self.kmin, self.kmax = {}, {}  # per layer: [Hkv, n_pages, D]

    def prefill(self, layer, q, k, q_raw):
        if layer < 2:
            return
        Hkv, L, D = k.shape
        pad = -L % self.page_size
        kp = F.pad(k, (0, 0, 0, pad)).view(Hkv, -1, self.page_size, D)
        full = torch.arange(L + pad, device=k.device).view(-1, self.page_size)[:, :, None] < L  # [n_pages, P, 1]
        self.kmin[layer] = kp.masked_fill(~full, float("inf")).amin(2)
        self.kmax[layer] = kp.masked_fill(~full, float("-inf")).amax(2)

    def attend(self, layer, q, k, v, q_raw):
        Hkv, T, D = k.shape
        if layer < 2:
            return self.run(q, k, v)[0]
        cur, P = T - 1, self.page_size
        key = k[:, cur:cur + 1]  # the current token's key enters the newest page's bounds
        if cur % P == 0:
            self.kmin[layer] = torch.cat([self.kmin[layer], key], 1)
            self.kmax[layer] = torch.cat([self.kmax[layer], key], 1)
        else:
            self.kmin[layer][:, -1:] = torch.minimum(self.kmin[layer][:, -1:], key)
            self.kmax[layer][:, -1:] = torch.maximum(self.kmax[layer][:, -1:], key)
        # Upper bound of q.k over a page: sum_d max(q_d min_d, q_d max_d), then the max over the group.
        qg = q.view(Hkv, -1, D)
        bound = qg.clamp(min=0) @ self.kmax[layer].transpose(1, 2) + qg.clamp(max=0) @ self.kmin[layer].transpose(1, 2)
        bound = bound.float().amax(1)  # [Hkv, n_pages]
        bound[:, -1] = float("inf")  # the newest page always comes
        self.read += bound.shape[1]  # min and max of each page: as many bytes as one position's key and value
        pages = bound.topk(min(self.pages, bound.shape[1]), dim=-1).indices  # the newest page first
        offsets = torch.arange(P, device=k.device)
        older = (pages[:, 1:, None] * P + offsets).flatten(1)
        newest = positions(torch.arange(cur - cur % P, cur, device=k.device), Hkv)
        return self.run(q, k, v, torch.cat([older, newest], 1))[0]


class Oracle(Policy):
    """The best K positions for each step: a full pass for the scores, then attention to their top-K.
    As costly as full attention; an upper bound for any K-token selection."""

    def __init__(self, budget):
        super().__init__()
        if budget < 1:
            raise ValueError(f"oracle needs budget >= 1 (got {budget})")
        self.budget = budget

    def attend(self, layer, q, k, v, q_raw):
        scores = group_max(self.score_pass(q, k, v)[:, :-1], k.shape[0])  # past positions only
        idx = scores.topk(min(self.budget, scores.shape[1]), dim=-1).indices
        return self.run(q, k, v, idx)[0]


POLICIES = {"full": Policy, "refreshkv": RefreshKV, "streamingllm": StreamingLLM, "snapkv": SnapKV,
            "h2o": H2O, "tova": TOVA, "quest": Quest, "oracle": Oracle}
