"""A picture of what a policy keeps: for one layer and KV head, decode step by cache position.

    python refreshkv.py --prompt examples/chain_of_key.txt --compare full,refreshkv:pool=31,snapkv:pool=31 --plot out/cache.png

record(policy, layer, head) wraps that one policy instance's attend and run (policies.py is not
changed) so that each decode step of `layer` notes two things for KV head `head`:
  - what full attention would attend to: the softmax of this step's query over every position so
    far (the max over the head's query group, as the policies score positions);
  - what the policy's selection holds: the positions the step attended to.
draw() puts them side by side: a panel of full attention's scores, then for each policy a panel
of its selection with those scores on top, blue where the selection holds the position and red
where it does not (attention lost to eviction). Full steps are marked above each panel.
Recording reads tensors on the host at every step, so refreshkv.py runs without CUDA graphs then.
"""
import math

import torch
import torch.nn.functional as F

ROWS = 480  # cache positions are max-pooled into at most this many rows of pixels


class Recorder:
    """The record of one generation: per decode step of the chosen layer, full attention's scores
    [pos + 1], the positions held, and whether it was a full step."""

    def __init__(self, policy, layer, head):
        self.layer, self.head = layer, head
        self.scores, self.held, self.full = [], [], []
        self.layer_now = None
        attend, run, score_pass = policy.attend, policy.run, policy.score_pass

        def recorded_attend(layer, q, k, v, pos, q_raw):
            self.layer_now = layer
            return attend(layer, q, k, v, pos, q_raw)

        def recorded_run(q, k, v, pos, idx=None, *args, **kwargs):
            if self.layer_now == self.layer:  # a check step whose device flag fired attends to everything
                fired = kwargs.get("full") is not None and bool(kwargs["full"].any())
                self.note(q, k, int(pos), None if fired else idx)
            return run(q, k, v, pos, idx, *args, **kwargs)

        def recorded_score_pass(q, k, v, pos):
            if self.layer_now == self.layer:
                self.scored = True  # a pass over every position for its scores: a full step too
            return score_pass(q, k, v, pos)

        policy.attend, policy.run, policy.score_pass = recorded_attend, recorded_run, recorded_score_pass
        self.scored = False

    def note(self, q, k, pos, idx):
        """q [H, D], k [Hkv, N, D], idx [Hkv, n] or None (every position)."""
        Hkv, _, D = k.shape
        qg = q.view(Hkv, -1, D)[self.head].float()  # [G, D]
        s = (qg @ k[self.head, :pos + 1].float().T / math.sqrt(D)).softmax(-1).amax(0)  # [pos + 1]
        held = torch.arange(pos + 1) if idx is None else \
            torch.cat([idx[self.head][idx[self.head] >= 0].cpu(), torch.tensor([pos])])
        self.scores.append(s.cpu())
        self.held.append(held)
        self.full.append(idx is None or self.scored)
        self.scored = False

    def grids(self, n):
        """(scores, held) [n positions, steps] for the recorded steps."""
        scores, held = torch.zeros(n, len(self.scores)), torch.zeros(n, len(self.scores))
        for t, (s, h) in enumerate(zip(self.scores, self.held)):
            scores[:len(s), t] = s
            held[h, t] = 1
        return scores, held


def record(policy, layer, head):
    return Recorder(policy, layer, head)


def prompt_regions(text, tokenizer, prompt, chat=False):
    """[(name, first position, end)] of the prompt: context / question / answer when the text has a
    'Question:' line and an 'Answer:' line (the bundled tasks), else one region."""
    q, a = text.rfind("Question:"), text.rfind("Answer:\n")
    if chat or q < 0 or a < q:
        return [("prompt", 0, len(prompt))]
    ends = [0]  # byte offset where each prompt token ends, the <|begin_of_text|> token taking none
    for token in prompt[1:]:
        ends.append(ends[-1] + len(tokenizer.decode_bytes([token])))
    at = lambda i: 1 + sum(e <= len(text[:i].encode()) for e in ends[1:])  # first token at char i
    q_at, a_at = at(q), at(a + len("Answer:\n"))
    return [("context", 0, q_at), ("question", q_at, a_at), ("answer", a_at, len(prompt))]


def pooled(grid, how):
    """Max- or mean-pool the rows of [n, steps] down to at most ROWS rows."""
    k = math.ceil(grid.shape[0] / ROWS)
    pool = F.max_pool1d if how == "max" else F.avg_pool1d
    return pool(grid.T[None], k, k, ceil_mode=True)[0].T


def intensity(scores):
    """Attention probabilities -> 0..1, each step's largest 1."""
    return scores / scores.amax(0).clamp(min=1e-9)


def spread(ys, gap, end):
    """Increasing label positions moved apart by at least gap, kept within [0, end]."""
    ys = list(ys)
    for i in range(1, len(ys)):
        ys[i] = max(ys[i], ys[i - 1] + gap)
    ys[-1] = min(ys[-1], end)
    for i in range(len(ys) - 2, -1, -1):
        ys[i] = min(ys[i], ys[i + 1] - gap)
    return ys


def draw(path, runs, regions, layer, head, title):
    """runs: [(label, Recorder)], the reference first (full attention when compared); regions of the
    prompt as prompt_regions gives them. Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    runs = [(label, r) for label, r in runs if r.scores]
    if not runs:
        raise ValueError("no decode step to draw (the first token ended the text)")
    n = max(len(s) for _, r in runs for s in r.scores)  # cache positions used
    regions = regions + [("generated", regions[-1][2], n)]
    panels = [(f"full attention ({runs[0][0]}'s queries)", runs[0][1], None)]
    panels += [(f"held by {label}", r, "held") for label, r in runs if any(not f for f in r.full)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1, 5.2), sharey=True, squeeze=False)
    for ax, (name, r, kind) in zip(axes[0], panels):
        scores, held = r.grids(n)
        a = intensity(pooled(scores, "max"))
        if kind is None:
            image = plt.cm.Greys(a.numpy())[..., :3]
        else:  # grey where held; scores drawn blue where held, red where not (lost)
            h = pooled(held, "mean")[..., None]
            base = 1 - 0.25 * h
            lost, kept = torch.tensor([0.85, 0.1, 0.1]), torch.tensor([0.1, 0.3, 0.9])
            colour = h * kept + (1 - h) * lost
            image = (base * (1 - a[..., None]) + colour * a[..., None]).numpy()
        steps = scores.shape[1]
        ax.imshow(image, aspect="auto", interpolation="nearest", extent=(1.5, steps + 1.5, n, 0))
        full = [t + 2 for t, f in enumerate(r.full) if f]
        if kind is not None and full:
            ax.plot(full, [0] * len(full), "v", color="black", markersize=4, clip_on=False)
        for _, start, _ in regions[1:]:
            ax.axhline(start, color="tab:green", linewidth=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("decode step (token)")
    axes[0][0].set_yticks(spread([(s + e) / 2 for _, s, e in regions], n / 25, n), [name for name, _, _ in regions])
    axes[0][0].set_ylabel(f"cache position (0..{n - 1})")
    fig.suptitle(f"{title}\nlayer {layer}, KV head {head}; full steps \u25bc; blue: attention the selection holds, "
                 f"red: attention it lost", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
