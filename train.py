"""Train the bundled model on the long-input, long-output tasks of tasks.py.

    # the bundled model on one H100: the BPE vocabulary, then ~6 min of plain training...
    python train.py --minutes 5.8 --check-n 48 --out $OUT/model
    # ...then RefreshKV-aware training from it (answer tokens attend as the decode policy lets them)
    python train.py --init $OUT/model --aware --minutes 4.3 --lr 5e-4 --warmup 50 --out $OUT/aware
    # ...then with the look-ahead loss (README lists the three runs the bundled model had)
    python train.py --init $OUT/aware --aware --lookahead 10 --minutes 6.6 --lr 5e-4 --warmup 50 --out $OUT/la
    # CPU smoke test (tiny model, short sequences)
    python train.py --device cpu --tiny --minutes 0.5 --out /tmp/x

A small Llama (model.py's own modules) learns chain-of-key, multi-key retrieval and
id-range lookups, plus a little Python-stdlib source so it can continue plain text.
The vocabulary is a byte-pair encoding trained here (train_bpe) on the same kind of text,
with Llama-3's split pattern, saved as the model's tokenizer.model rank file.
Each training row is one context followed by as many question/answer rounds as fit,
each answer closed by <|end_of_text|>; the loss covers the answers and their
end-of-text (and, at a small weight, the context, whose repeated keys teach copying).
A curriculum grows the rows from 512 to 4608 tokens; worker processes build the
batches so the GPU never waits. Training stops by wall time, saves bf16 weights with
model.save, reloads them and prints a full-attention accuracy table on held-out
seeds. Everything goes to --out: config.json, model.safetensors, tokenizer.model,
train_log.txt. The prompt files in examples/ come from `python tasks.py examples`.

RefreshKV-aware training (--aware; the paper's section 6, with refreshes): half the batches are
single-question rows whose answer tokens attend as RefreshKV's decode steps would, the prompt
under full causal attention (RefreshAttention); the other half are plain rows, so that full
attention does not get worse. Stride and budget are drawn per batch, so one model serves many
settings; gradients flow through the attention but not through the discrete selection.
--lookahead W adds a loss that teaches what the selection cannot: a full step should already attend
to what the next W-1 steps will need (RefreshAttention.lookahead_loss); --lookahead-focus weights
each layer's share by what its selection still misses, and --lookahead-layers keeps it to chosen
layers (on the bundled model one layer decides a fixed stride: tools/foresight.py --layers).
"""
import argparse
import heapq
import json
import math
import multiprocessing as mp
import os
import random
import sysconfig
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import regex

import model as llama
import tasks
from policies import pool
from refreshkv import Parser
from tokenizer import PAT_STR, Tokenizer

# per-token loss classes: 0 none, 1 answer (+ its end-of-text), 2 context, 3 plain text
NONE, ANSWER, CONTEXT, TEXT = 0, 1, 2, 3
MIX = {"chain_of_key": 0.55, "multi_key": 0.17, "id_range": 0.20, "text": 0.08}
N_MAX = {"chain_of_key": 12, "multi_key": 8, "id_range": 10}  # most items per question
BYTES_PER_TOKEN = 2.3  # of task text under the trained vocabulary (measured ~2.2; rows are cut to length)
TOK = None  # the tokenizer, set before the data workers fork


def model_args(tiny, vocab_size, context):
    if tiny:
        return llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                               hidden_dim=128, rope_theta=10000.0, max_seq_len=context,
                               bos_id=vocab_size - 2, eos_ids=(vocab_size - 1,))
    # ~14.2M parameters: 28.4 MB in bf16
    return llama.ModelArgs(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, vocab_size=vocab_size,
                           hidden_dim=1024, rope_theta=10000.0, max_seq_len=context,
                           bos_id=vocab_size - 2, eos_ids=(vocab_size - 1,))


# ---------------------------------------------------------------- BPE vocabulary

def train_bpe(text, n_ranks):
    """Byte-pair encoding with Llama-3's split pattern: cut the text into pieces as Llama-3 does,
    start from the 256 single bytes, and merge the most frequent adjacent pair (counted within
    pieces) into a new token until there are n_ranks tokens. -> ranks {token bytes: rank},
    the order of creation, as tiktoken and Llama-3's tokenizer.model expect."""
    counts = {}
    for piece in regex.findall(PAT_STR, text):
        counts[piece] = counts.get(piece, 0) + 1
    words = [list(p.encode()) for p in counts]  # each distinct piece as token ids
    freq = list(counts.values())
    pairs, where, heap = {}, {}, []  # pair -> count; pair -> pieces holding it; (-count, pair), stale ones too

    def count(i, sign):
        w = words[i]
        for pair in zip(w, w[1:]):
            pairs[pair] = pairs.get(pair, 0) + sign * freq[i]
            heapq.heappush(heap, (-pairs[pair], pair))
            if sign > 0:
                where.setdefault(pair, set()).add(i)

    for i in range(len(words)):
        count(i, 1)
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    while len(vocab) < n_ranks and heap:
        c, (a, b) = heapq.heappop(heap)
        if -c != pairs.get((a, b)):
            continue  # a stale entry
        if -c < 2:
            break
        token = vocab[a] + vocab[b]
        if token not in ranks:  # the same bytes may come from another pair: they keep one rank
            ranks[token] = len(vocab)
            vocab.append(token)
        new = ranks[token]
        for i in where.pop((a, b)):
            w = words[i]
            count(i, -1)
            out, j = [], 0
            while j < len(w):
                merge = j + 1 < len(w) and w[j] == a and w[j + 1] == b
                out.append(new if merge else w[j])
                j += 2 if merge else 1
            words[i] = out
            count(i, 1)
    return ranks


# ---------------------------------------------------------------- data (worker processes)

_TEXT_FILES = None


def stdlib_files():
    global _TEXT_FILES
    if _TEXT_FILES is None:
        _TEXT_FILES = []
        for d, dirs, fs in os.walk(sysconfig.get_paths()["stdlib"]):
            dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
            _TEXT_FILES += [os.path.join(d, f) for f in sorted(fs) if f.endswith(".py")]
    return _TEXT_FILES


def stdlib_text(rng, n_bytes):
    """About n_bytes of Python standard-library source ("" where none is found)."""
    out, tries, files = [], 0, stdlib_files()
    while sum(map(len, out)) < n_bytes and files and tries < 1000:
        tries += 1
        try:
            with open(rng.choice(files), "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if len(data) >= 200:
            out.append(data[rng.randrange(len(data) // 2) if not out else 0:])
    return out


def text_row(rng, n):
    """n tokens of Python standard-library source, files joined by end-of-text (None: none found)."""
    out = []
    for doc in stdlib_text(rng, int(n * 4)):  # source code is ~3-4 bytes a token
        out += TOK.encode(doc) + [eos()]
    return out[:n] if len(out) >= n else None


def eos():
    """<|end_of_text|>: the id after <|begin_of_text|> in our vocabulary."""
    return TOK.bos_id + 1


def task_row(rng, task, n, rounds=None):
    """n tokens: BOS, a context, then question/answer rounds until the row is full
    (rounds=1: exactly one, with the context filling the rest of the row)."""
    if rounds == 1:
        k = rng.randint(1, N_MAX[task])
        world = tasks.WORLDS[task](rng, length=int((n - 40 - 12 * k) * BYTES_PER_TOKEN * 0.9),
                                   **(dict(min_cycle=k + 1) if task == "chain_of_key" else {}))
        ctx, qa = world["context"], [tasks.ASKS[task](rng, world, k)[:2]]
    else:
        frac = rng.uniform(0.55, 0.92)  # context share of the row; the rest is rounds
        ctx, qa = tasks.training_rounds(rng, task, int(frac * n * BYTES_PER_TOKEN),
                                        int((1 - frac) * n * BYTES_PER_TOKEN) - 2, N_MAX[task])
    c = TOK.encode(ctx)
    toks, cls = [TOK.bos_id] + c, [NONE] + [CONTEXT] * len(c)
    for q, a in qa:
        qt, at = TOK.encode(q), TOK.encode(a) + [eos()]
        toks += qt + at
        cls += [NONE] * len(qt) + [ANSWER] * len(at)
    pad = max(0, n - len(toks))
    return (toks + [eos()] * pad)[:n], (cls + [NONE] * pad)[:n]


def make_batch(spec):
    """One batch: tokens [rows, T+1] int32, loss classes [rows, T+1] uint8, and `aware`: True for
    single-question rows of the three tasks (for RefreshAttention), False for the training mix."""
    seed, T, rows, aware = spec
    rng = random.Random(seed)
    names, weights = list(MIX), list(MIX.values())
    toks = np.zeros((rows, T + 1), np.int32)
    cls = np.zeros((rows, T + 1), np.uint8)
    for r in range(rows):
        task = rng.choices(names[:3] if aware else names, weights[:3] if aware else weights)[0]
        row = text_row(rng, T + 1) if task == "text" else None
        if row is not None:
            toks[r], cls[r] = row, TEXT
        else:
            toks[r], cls[r] = task_row(rng, "chain_of_key" if task == "text" else task, T + 1, 1 if aware else None)
    return toks, cls, aware


def bpe_corpus(seed, n_bytes):
    """Training-distribution text for the BPE vocabulary: task rows and some stdlib source."""
    rng, parts, size = random.Random(seed), [], 0
    while size < n_bytes:
        task = rng.choices(list(MIX), list(MIX.values()))[0]
        if task == "text":
            part = "".join(stdlib_text(rng, 4000))
        else:
            ctx, rounds = tasks.training_rounds(rng, task, rng.randint(1000, 9000), 1500, N_MAX[task])
            part = ctx + "".join(q + a for q, a in rounds)
        parts.append(part)
        size += len(part)
    return "".join(parts)


def curriculum(p, buckets):
    """Row length for training progress p in [0, 1]: short rows first, then a mix
    that favours the longest (eval prompts are up to ~4K bytes)."""
    n = len(buckets)
    allowed = max(1, min(n, 1 + int(p / 0.55 * n)))  # all lengths from 55% of the time on
    return buckets[:allowed], list(range(1, allowed + 1))


class Loader:
    """Batches built ahead of time by a pool of worker processes."""

    def __init__(self, workers, seed, buckets, tokens_per_step, depth):
        self.pool = mp.get_context("fork").Pool(workers) if workers > 0 else None
        self.rng, self.seed, self.buckets, self.tps = random.Random(seed), seed, buckets, tokens_per_step
        self.queue, self.n, self.depth, self.p_min, self.aware = deque(), 0, depth, 0.0, False

    def submit(self, p):
        lens, w = curriculum(max(p, self.p_min), self.buckets)
        T = self.rng.choices(lens, w)[0]
        spec = (self.seed * 10**7 + self.n, T, max(1, self.tps // T), self.aware and self.n % 2 == 0)
        self.n += 1
        self.queue.append(self.pool.apply_async(make_batch, (spec,)) if self.pool else make_batch(spec))

    def next(self, p):
        while len(self.queue) < self.depth:
            self.submit(p)
        item = self.queue.popleft()
        self.submit(p)
        return item.get() if self.pool else item

    def close(self):
        if self.pool:
            self.pool.terminate()


# ---------------------------------------------------------------- RefreshKV-aware attention

class RefreshAttention:
    """Attention for RefreshKV-aware training (model.forward's `policy` in training). Each row holds a
    prompt and one answer: start [B] is the answer's first position, length [B] its tokens. The prompt
    attends causally, as in prefill. Row start + i is decode step t = i + 2 (the first answer token
    comes from the prefill): a full step when t % stride == 0, attending causally; otherwise a
    partial step, attending to what RefreshKV's small cache holds then: the top positions of the last
    full step's scores (the prefill's last query, or the last full answer row; softmax over the
    positions up to it, max over the query group, max-pooled), one fewer for each answer token that
    joined since, plus those tokens (the latest K of them) and itself. budget [B]: K per row. Ties at the K-th score keep
    all tied positions; the selection carries no gradient. lookahead W > 1: each layer also appends
    its look-ahead (loss, recall) to `aux` (lookahead_loss), which train_step adds to the loss."""

    def __init__(self, start, length, budget, stride, pool_kernel=7, lookahead=0):
        self.start, self.length, self.budget, self.pool = start, length, budget, pool_kernel
        self.lookahead, self.aux = lookahead, []  # aux: (loss, recall) of each layer, see lookahead_loss
        i = torch.arange(int(length.max()), device=start.device)  # answer rows, relative to start
        full = (i + 2) % stride == 0
        self.src = torch.cat([i.new_tensor([-1]), i[full]])  # rows of the full steps (-1: the prefill's last)
        self.last = torch.searchsorted(self.src, i) - 1  # for row i: its last full step, an index into src
        self.joined = i - 1 - self.src[self.last]  # answer tokens that joined the small cache since
        self.partial = ~full & (i < length[:, None])  # [B, A]
        self.i = i

    def __call__(self, layer, q, k, v):
        (B, H, T, D), Hkv = q.shape, k.shape[1]
        if self.lookahead > 1:
            self.aux.append(self.lookahead_loss(q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        A, pos = len(self.i), torch.arange(T, device=q.device)
        rows = self.start[:, None] + self.i  # [B, A]
        with torch.no_grad():
            src = (self.start[:, None] + self.src).clamp(0, T - 1)  # [B, nF]
            qf = q.gather(2, src[:, None, :, None].expand(B, H, -1, D)).view(B, Hkv, H // Hkv, -1, D)
            future = pos > src[:, None, None, :, None]  # [B, 1, 1, nF, T]
            s = (qf @ k[:, :, None].transpose(-1, -2)).float() / math.sqrt(D)  # [B, Hkv, G, nF, T]
            probs = s.masked_fill(future, float("-inf")).softmax(-1).amax(2)  # [B, Hkv, nF, T]
            probs = pool(probs.flatten(0, 2), self.pool).view_as(probs).masked_fill(future[:, 0], float("-inf"))
            # the K-th best score of each full step, K shrinking by one per joined token
            keep = self.budget[:, None] - self.joined  # [B, A]
            ranked = probs.sort(-1, descending=True).values.flatten(2)  # [B, Hkv, nF * T]
            at = (self.last * T + (keep - 1).clamp(0, T - 1))[:, None].expand(B, Hkv, A)
            kth = ranked.gather(2, at)[..., None]  # [B, Hkv, A, 1]
            f = src.gather(1, self.last[None].expand(B, A))[:, None, :, None]  # [B, 1, A, 1]
            chosen = (probs[:, :, self.last] >= kth) & (pos <= f) & (keep > 0)[:, None, :, None]
            oldest = torch.maximum(f, rows[:, None, :, None] - 1 - self.budget[:, None, None, None])  # past K joined,
            mask = chosen | ((pos > oldest) & (pos <= rows[:, None, :, None]))  # the oldest left; [B, Hkv, A, T]
        qa = q.gather(2, rows.clamp(max=T - 1)[:, None, :, None].expand(B, H, A, D))
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # flash takes no mask
            out = F.scaled_dot_product_attention(qa, k, v, attn_mask=mask.repeat_interleave(H // Hkv, 1), enable_gqa=True)
        # partial rows take `out`; the others keep y (their writes go to spare rows past T)
        dest = torch.where(self.partial, rows, T + self.i)[:, None, :, None].expand(B, H, A, D)
        return torch.cat([y, y.new_zeros(B, H, A, D)], 2).scatter(2, dest, out)[:, :, :T]

    def lookahead_loss(self, q, k):
        """The look-ahead loss of one layer (train.py --lookahead W). The selection carries no
        gradient, so nothing above teaches a full step to keep what the next steps will need. This
        does: for each query that could be a full step (the prefill's last, every answer row), the
        prompt positions that one of the next W-1 rows attends to strongly under full attention
        (probability >= 0.05, max over the query group; a diffuse head's share is ~1/L and no top-K
        can hold it all) are pushed above the top-K threshold of this query's own pooled selection
        score: softplus(threshold + 1 - score) in log-probability, weighted by that probability.
        Positions already kept with a margin cost ~0, so full attention is left alone. Also returns
        the recall: the share of that weight the selection keeps today."""
        (B, H, T, D), Hkv = q.shape, k.shape[1]
        u = torch.arange(len(self.i) + 1, device=q.device)  # query rows start-1+u, u = 0..A
        rows = (self.start[:, None] - 1 + u).clamp(0, T - 1)  # [B, A + 1]
        qa = q.gather(2, rows[:, None, :, None].expand(B, H, -1, D)).view(B, Hkv, H // Hkv, -1, D)
        pos = torch.arange(T, device=q.device)
        s = (qa @ k[:, :, None].transpose(-1, -2)).float() / math.sqrt(D)  # [B, Hkv, G, A + 1, T]
        s = s.masked_fill(pos > rows[:, None, None, :, None], float("-inf"))
        lp = s.log_softmax(-1).amax(2)  # the selection's score, as a log-probability [B, Hkv, A + 1, T]
        prompt = pos < self.start[:, None, None, None]  # answer tokens join the small cache anyway
        score = pool(lp.flatten(0, 2), self.pool).view_as(lp).masked_fill(~prompt, float("-inf"))
        valid = u <= self.length[:, None]  # [B, A + 1]
        with torch.no_grad():
            p = lp.exp().masked_fill(~prompt, 0) * valid[:, None, :, None]
            want = torch.zeros_like(p)  # the most each prompt position gets from rows u+1..u+W-1
            for j in range(1, self.lookahead):
                want[:, :, :-j] = torch.maximum(want[:, :, :-j], p[:, :, j:])
            want *= want >= 0.05
            ranked = score.sort(-1, descending=True).values
            kth = ranked.gather(-1, (self.budget - 1).clamp(0, T - 1)[:, None, None, None].expand(B, Hkv, len(u), 1))
            kept = score >= kth
        miss = F.softplus(kth + 1.0 - score.clamp(min=-1e4))  # [B, Hkv, A + 1, T]
        total = want.sum().clamp(min=1e-6)
        return (want * miss).sum() / total, ((want * kept).sum() / total).detach()


def refresh_attention(rng, cls, lookahead=0):
    """A RefreshAttention for a batch of single-question rows (loss classes [B, T]), with a stride
    and a budget fraction drawn for the batch: one model for many settings."""
    ans = cls == ANSWER
    has = ans.any(1)
    start = torch.where(has, ans.int().argmax(1), cls.shape[1] - 1)
    length = ans.sum(1)
    frac = 2 ** rng.uniform(-4, -2)  # K from L/16 to L/4
    stride = rng.randint(3, 16)
    budget = (start * frac).long().clamp(min=1)
    return RefreshAttention(start, length, budget, stride, lookahead=lookahead), (stride, frac)


# ---------------------------------------------------------------- model and optimizer

def init_weights(model):
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
    n = model.args.n_layers
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * n) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)


def make_optimizer(model, lr, wd, device):
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "tok_embeddings" not in n)]
    groups = [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=(device == "cuda"))


def lr_at(step, p, args):
    """Linear warmup over steps, then cosine decay over the wall-time fraction p to lr/10."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def sdpa_context(model, device, log):
    """Flash attention only, if it works here (so a silent fallback to the O(L^2)-memory
    math kernel can never slow training down); otherwise whatever SDPA picks."""
    import contextlib
    if device != "cuda":
        return contextlib.nullcontext
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", torch.bfloat16):
            model(torch.zeros(1, 64, dtype=torch.long, device=device)).sum().backward()
        model.zero_grad(set_to_none=True)
        log("attention: flash only")
        return lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    except Exception as e:
        model.zero_grad(set_to_none=True)
        log(f"attention: flash unavailable ({str(e).splitlines()[0][:120]}), SDPA chooses")
        return contextlib.nullcontext


def lookahead_total(aux, focus=False, layers=None):
    """The layers' look-ahead losses [(loss, recall), ...] as one: their mean, or with focus each layer
    weighted by 1 - its recall (what its selection still misses), the weights scaled to mean 1.
    layers: the layer indices whose losses count (None: all)."""
    aux = aux if layers is None else [aux[i] for i in layers]
    losses, recalls = torch.stack([a for a, _ in aux]), torch.stack([r for _, r in aux])
    if not focus:
        return losses.mean()
    miss = (1 - recalls).clamp(min=1e-3)
    return (miss / miss.mean() * losses).mean()


def train_step(model, inp, tgt, w, amp, attn_ctx, attention=None, look_weight=1.0, focus=False, layers=None):
    """Forward and backward of the weighted loss (plus look_weight times the look-ahead loss of `layers`,
    if the attention has one); returns the loss, the per-token cross-entropy [B, T] and the logits (for the log).
    attention: a RefreshAttention, or None for plain causal attention."""
    with amp, attn_ctx():
        logits = model(inp, policy=attention)
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), tgt.reshape(-1), reduction="none")
        ce = ce.view_as(tgt)
        loss = (ce * w).sum() / w.sum().clamp(min=1)
        aux = getattr(attention, "aux", None)
        (loss + look_weight * lookahead_total(aux, focus, layers) if aux else loss).backward()
    return loss, ce, logits


# ---------------------------------------------------------------- full-attention check

@torch.inference_mode()
def greedy(model, prompts, max_new, device):
    """Greedy decoding of a batch with the plain causal forward and no cache: rows are
    right-padded, so each row's next token is read at its own last position."""
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    buf = torch.full((B, int(lens.max()) + max_new), eos(), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = torch.tensor(p, device=device)
    cur, done = lens.clone(), torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new):
        act = (~done).nonzero().squeeze(1)
        if len(act) == 0:
            break
        logits = model(buf[act, :int(cur[act].max())])
        nxt = logits[torch.arange(len(act), device=device), cur[act] - 1].argmax(-1)
        buf[act, cur[act]] = nxt
        cur[act] += 1
        done[act] = (nxt == eos()) | (cur[act] - lens[act] >= max_new)
    outs = []
    for i in range(B):
        ids = buf[i, int(lens[i]):int(cur[i])].tolist()
        outs.append(TOK.decode([t for t in ids if t < TOK.bos_id]))
    return outs


def check(model, tok, device, tiny, n, log, batch=32):
    """Full-attention accuracy on held-out seeds, per task: chain-of-key exact match at
    each hop 1..8 (at several prompt lengths, in tokens), exact match for the other tasks."""
    hops = 4 if tiny else 8
    rows = ([("chain_of_key", L, hops) for L in ((100, 200) if tiny else (1000, 2000, 4000))]
            + [("multi_key", 200 if tiny else 2000, 3 if tiny else 6),
               ("id_range", 200 if tiny else 2000, 3 if tiny else 8)])
    log("full-attention check, held-out seeds (10^6+), greedy decoding")
    log(f"{'task':14s} {'tokens':>6s} {'n':>2s} {'N':>4s}  exact  items  | chain exact match at hop 1..{hops}")
    results = {}
    for task, L, k in rows:
        exs = [tasks.make_example(task, 10**6 + i, int(L * tasks.BYTES_PER_TOKEN[task]), k) for i in range(n)]
        L = round(sum(len(tok.encode(e.prompt)) for e in exs) / n)
        outs = []
        for i in range(0, n, batch):
            chunk = exs[i:i + batch]
            outs += greedy(model, [tok.encode(e.prompt, bos=True) for e in chunk],
                           max(len(e.answer) for e in chunk) + 8, device)
        sc = [tasks.score(e, o) for e, o in zip(exs, outs)]
        ex_acc = sum(s == e.n for s, e in zip(sc, exs)) / n
        items = sum(sum(tasks.item_scores(e, o)) for e, o in zip(exs, outs)) / sum(e.n for e in exs)
        line = f"{task:14s} {L:6d} {k:2d} {n:4d}  {ex_acc:5.1%} {items:6.1%}"
        if task == "chain_of_key":
            line += "  | " + " ".join(f"{a:4.0%}" for a in tasks.hop_accuracy(sc, hops))
        log(line)
        results[(task, L)] = ex_acc
    log(f"example: {exs[0].prompt[-60:]!r} -> {outs[0][:80]!r} (gold {exs[0].answer[:80]!r})")
    return results


# ---------------------------------------------------------------- main

def layer_list(s):
    """--lookahead-layers: "4" or "3,4" -> [4] or [3, 4]."""
    try:
        return [int(i) for i in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of layer numbers: {s!r}")


def main():
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--minutes", type=float, default=6.5, help="training wall time (stops by time)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model and short rows (CPU smoke test)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tokens-per-step", type=int, default=None, help="default 131072 (tiny: 4096)")
    ap.add_argument("--ctx-weight", type=float, default=0.1, help="loss weight of context tokens")
    ap.add_argument("--text-weight", type=float, default=0.25, help="loss weight of plain-text tokens")
    ap.add_argument("--workers", type=int, default=None, help="data worker processes")
    ap.add_argument("--check-n", type=int, default=None, help="held-out examples per check row")
    ap.add_argument("--compile", type=int, default=None,
                    help="1: torch.compile each block (dynamic shapes, compiled once); default 1 on CUDA")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--init", help="checkpoint dir to continue training from (all row lengths from the start)")
    ap.add_argument("--aware", action="store_true", help="RefreshKV-aware training (half the batches); use with --init")
    ap.add_argument("--lookahead", type=int, default=0,
                    help="with --aware: W > 1 adds the look-ahead loss (a full step keeps what the next W-1 steps need)")
    ap.add_argument("--lookahead-weight", type=float, default=1.0, help="the look-ahead loss's weight against the token loss")
    ap.add_argument("--lookahead-focus", action="store_true",
                    help="weight each layer's look-ahead loss by 1 - its recall (the layers that miss most)")
    ap.add_argument("--lookahead-layers", type=layer_list, default=None,
                    help="comma-separated layer indices whose look-ahead loss counts (default: every layer)")
    ap.add_argument("--vocab", type=int, default=None, help="BPE ranks to train (default 2046; tiny: 320)")
    ap.add_argument("--tokenizer", help="a tokenizer.model rank file to use instead of training one")
    args = ap.parse_args()
    if (args.lookahead_weight != 1.0 or args.lookahead_focus or args.lookahead_layers) and not (args.aware and args.lookahead > 1):
        ap.error("--lookahead-weight, --lookahead-focus and --lookahead-layers need --aware and --lookahead W > 1")
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "train_log.txt"), "w")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    t_start = time.time()
    device = args.device
    buckets = [128, 256] if args.tiny else [512, 1024, 2048, 3072, 4608]
    tps = args.tokens_per_step or (4096 if args.tiny else 131072)
    workers = args.workers if args.workers is not None else max(1, min(6, (os.cpu_count() or 2) - 2))
    global TOK  # the data workers fork with it, before CUDA is touched
    if args.init:
        TOK = llama.load_tokenizer(Path(args.init), json.loads((Path(args.init) / "config.json").read_text())["vocab_size"])
    elif args.tokenizer:
        TOK = Tokenizer.from_file(args.tokenizer, sum(1 for _ in open(args.tokenizer)) + 2)
    else:
        n_ranks = args.vocab or (320 if args.tiny else 2046)
        TOK = Tokenizer(train_bpe(bpe_corpus(args.seed, 300_000 if args.tiny else 1_500_000), n_ranks), 2, "refreshkv-tiny")
        log(f"BPE vocabulary: {n_ranks} ranks in {time.time() - t_start:.1f} s")
    loader = Loader(workers, args.seed, buckets, tps, depth=2 * workers + 2)
    loader.p_min = 0.55 if args.init else 0.0
    loader.aware = args.aware
    torch.manual_seed(args.seed)
    draw = random.Random(args.seed)  # the stride and budget of each RefreshKV-aware batch
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.init:  # continue training a saved checkpoint (fp32 master weights)
        model, _ = llama.load(args.init, device=device, dtype=torch.float32)
        model.train()
        margs = model.args
    else:
        margs = model_args(args.tiny, TOK.n_words, buckets[-1])
        model = llama.Transformer(margs)
        init_weights(model)
        model.to(device)
    if args.lookahead_layers and not all(0 <= i < margs.n_layers for i in args.lookahead_layers):
        ap.error(f"--lookahead-layers {args.lookahead_layers}: the model has layers 0..{margs.n_layers - 1}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"args: {vars(args)}")
    log(f"model: {margs}")
    log(f"{n_params / 1e6:.2f}M parameters, {workers} data workers, rows {buckets}, {tps} tokens/step")
    opt = make_optimizer(model, args.lr, args.wd, device)
    attn_ctx = sdpa_context(model, device, log)
    compiled = args.compile if args.compile is not None else int(device == "cuda" and not args.aware)
    if compiled:  # regional compilation: the 8 blocks share one compiled graph
        for layer in model.layers:
            layer.compile(dynamic=True)
    weight = torch.tensor([0.0, 1.0, args.ctx_weight, args.text_weight], device=device)
    amp = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    budget = args.minutes * 60
    t0 = time.time()
    step, tokens, wait, p = 0, 0, 0.0, 0.0
    t_log, tok_log = t0, 0
    log(f"startup {t0 - t_start:.1f} s; training for {args.minutes} min")
    t_end, t_first = t0 + budget, None  # progress p counts from the end of the first (compiling) step
    while True:
        now = time.time()
        if now >= t_end:
            break
        p = 0.0 if t_first is None else (now - t_first) / (t_end - t_first)
        tw = time.time()
        toks, cls, aware = loader.next(p)
        wait += time.time() - tw
        x = torch.from_numpy(toks.astype(np.int64))
        c = torch.from_numpy(cls)
        if device == "cuda":
            x, c = x.pin_memory().to(device, non_blocking=True), c.pin_memory().to(device, non_blocking=True)
        inp, tgt, w = x[:, :-1], x[:, 1:], weight[c[:, 1:].long()]
        lr = lr_at(step, p, args)
        for g in opt.param_groups:
            g["lr"] = lr
        attention, setting = refresh_attention(draw, c[:, :-1], args.lookahead) if aware else (None, None)
        try:
            loss, ce, logits = train_step(model, inp, tgt, w, amp, attn_ctx, attention, args.lookahead_weight, args.lookahead_focus,
                                         args.lookahead_layers)
        except Exception as e:
            if not compiled:
                raise
            # a compile failure: go on in eager mode rather than lose the run
            log(f"torch.compile failed ({str(e).splitlines()[0][:200]}); training eagerly")
            compiled = 0
            for layer in model.layers:
                layer._compiled_call_impl = None
            torch._dynamo.reset()
            opt.zero_grad(set_to_none=True)
            loss, ce, logits = train_step(model, inp, tgt, w, amp, attn_ctx)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
        step += 1
        if t_first is None:
            t_first = time.time()
            log(f"first step (compile included) {t_first - t0:.1f} s")
        if step % 25 == 0 or step == 1:
            # answer-token loss and accuracy: the number that matters
            with torch.no_grad():
                am = c[:, 1:] == ANSWER
                a_loss = (ce[am].mean()).item() if am.any() else float("nan")
                a_acc = (logits.argmax(-1)[am] == tgt[am]).float().mean().item() if am.any() else float("nan")
            now, el = time.time(), time.time() - t0
            rate, t_log, tok_log = (tokens - tok_log) / (now - t_log), now, tokens
            look = ""
            if setting and attention.aux:  # (loss, recall) per layer
                la = torch.stack([torch.stack(a) for a in attention.aux])
                look = " | look-ahead loss {:.3f} recall {:.3f} (means of all layers; recall by layer {})".format(
                    *la.mean(0).tolist(), " ".join(f"{r:.3f}" for r in la[:, 1].tolist()))
            log(f"step {step:5d} | {el:6.1f} s | T {x.shape[1] - 1:4d} x {x.shape[0]:3d} | lr {lr:.2e} | "
                f"loss {loss.item():.4f} | answer loss {a_loss:.4f} acc {a_acc:.4f} | gnorm {gnorm:.2f} | "
                f"{rate / 1e6:.2f} Mtok/s | data wait {wait:.1f} s"
                + (f" | refresh S={setting[0]} K={setting[1]:.3f}L" if setting else "") + look)
    loader.close()
    el = time.time() - t0
    log(f"trained {step} steps, {tokens / 1e6:.1f}M tokens in {el:.1f} s ({tokens / el / 1e6:.2f} Mtok/s, "
        f"data wait {wait:.1f} s)")

    # save bf16 weights (the checkpoint stays under 30 MB), then reload what was saved and check it
    model.to(torch.bfloat16)
    llama.save(model, args.out, TOK, shard_bytes=15_000_000)  # shards of < 16 MB
    del model, opt
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors")) / 1e6
    log(f"saved {args.out} (safetensors {size:.1f} MB)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m, tok = llama.load(args.out, device=device, dtype=dtype)
    tc = time.time()
    with attn_ctx():
        check(m, tok, device, args.tiny, args.check_n or (8 if args.tiny else 48), log)
    log(f"check took {time.time() - tc:.1f} s; total wall time {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
