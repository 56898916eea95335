"""Train the bundled byte-level model on the long-input, long-output tasks of tasks.py.

    # the bundled model, on one H100 (~6.5 min of training, ~8 min in all)
    python train.py --minutes 6.5 --out models/refreshkv-tiny
    # CPU smoke test (tiny model, short sequences)
    python train.py --device cpu --tiny --minutes 0.5 --out /tmp/x

A small Llama (model.py's own modules) learns chain-of-key, multi-key retrieval and
id-range lookups, plus a little Python-stdlib source so it can continue plain text.
Each training row is one context followed by as many question/answer rounds as fit,
each answer closed by <|end_of_text|>; the loss covers the answers and their
end-of-text (and, at a small weight, the context, whose repeated keys teach copying).
A curriculum grows the rows from 512 to 4608 tokens; worker processes build the
batches so the GPU never waits. Training stops by wall time, saves bf16 weights with
model.save, reloads them and prints a full-attention accuracy table on held-out
seeds. Everything goes to --out: config.json, model.safetensors, tokenizer.model,
train_log.txt. The prompt files in examples/ come from `python tasks.py examples`.
"""
import argparse
import math
import multiprocessing as mp
import os
import random
import sysconfig
import time
from collections import deque

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F

import model as llama
import tasks
from tokenizer import Tokenizer

BOS, EOS = 256, 257
# per-token loss classes: 0 none, 1 answer (+ its end-of-text), 2 context, 3 plain text
NONE, ANSWER, CONTEXT, TEXT = 0, 1, 2, 3
MIX = {"chain_of_key": 0.55, "multi_key": 0.17, "id_range": 0.20, "text": 0.08}
N_MAX = {"chain_of_key": 12, "multi_key": 8, "id_range": 10}  # most items per question


def model_args(tiny):
    if tiny:
        return llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258,
                               hidden_dim=128, rope_theta=10000.0, max_seq_len=8192,
                               bos_id=BOS, eos_ids=(EOS,))
    # ~12.8M parameters: 25.6 MB in bf16
    return llama.ModelArgs(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, vocab_size=258,
                           hidden_dim=1024, rope_theta=10000.0, max_seq_len=8192,
                           bos_id=BOS, eos_ids=(EOS,))


# ---------------------------------------------------------------- data (worker processes)

_TEXT_FILES = None


def text_row(rng, n):
    """n tokens of Python standard-library source, files joined by end-of-text."""
    global _TEXT_FILES
    if _TEXT_FILES is None:
        _TEXT_FILES = []
        for d, dirs, fs in os.walk(sysconfig.get_paths()["stdlib"]):
            dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
            _TEXT_FILES += [os.path.join(d, f) for f in sorted(fs) if f.endswith(".py")]
    out, tries = [], 0
    while len(out) < n and _TEXT_FILES and tries < 1000:
        tries += 1
        try:
            with open(rng.choice(_TEXT_FILES), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if len(data) < 200:
            continue
        start = rng.randrange(len(data) // 2) if not out else 0
        out += list(data[start:]) + [EOS]
    return out[:n] if len(out) >= n else None  # None: no stdlib source found here


def task_row(rng, task, n):
    """n tokens: BOS, a context, then question/answer rounds until the row is full."""
    frac = rng.uniform(0.55, 0.92)  # context share of the row; the rest is rounds
    ctx, rounds = tasks.training_rounds(rng, task, int(frac * n), int((1 - frac) * n) - 2, N_MAX[task])
    toks, cls = [BOS] + list(ctx.encode()), [NONE] + [CONTEXT] * len(ctx)
    for q, a in rounds:
        qb, ab = q.encode(), a.encode()
        toks += list(qb) + list(ab) + [EOS]
        cls += [NONE] * len(qb) + [ANSWER] * (len(ab) + 1)
    pad = max(0, n - len(toks))
    return (toks + [EOS] * pad)[:n], (cls + [NONE] * pad)[:n]


def make_batch(spec):
    """One batch: tokens [rows, T+1] uint16 and loss classes [rows, T+1] uint8."""
    seed, T, rows = spec
    rng = random.Random(seed)
    names, weights = list(MIX), list(MIX.values())
    toks = np.zeros((rows, T + 1), np.uint16)
    cls = np.zeros((rows, T + 1), np.uint8)
    for r in range(rows):
        task = rng.choices(names, weights)[0]
        row = text_row(rng, T + 1) if task == "text" else None
        if row is not None:
            toks[r], cls[r] = row, TEXT
        else:
            toks[r], cls[r] = task_row(rng, "chain_of_key" if task == "text" else task, T + 1)
    return toks, cls


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
        self.queue, self.n, self.depth, self.p_min = deque(), 0, depth, 0.0

    def submit(self, p):
        lens, w = curriculum(max(p, self.p_min), self.buckets)
        T = self.rng.choices(lens, w)[0]
        spec = (self.seed * 10**7 + self.n, T, max(1, self.tps // T))
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
    from torch.nn.attention import SDPBackend, sdpa_kernel
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


def train_step(model, inp, tgt, w, amp, attn_ctx):
    """Forward and backward of the weighted loss; returns the loss, the per-token
    cross-entropy [B, T] and the logits (for the log)."""
    with amp, attn_ctx():
        logits = model(inp)
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), tgt.reshape(-1), reduction="none")
        ce = ce.view_as(tgt)
        loss = (ce * w).sum() / w.sum().clamp(min=1)
        loss.backward()
    return loss, ce, logits


# ---------------------------------------------------------------- full-attention check

@torch.inference_mode()
def greedy(model, prompts, max_new, device):
    """Greedy decoding of a batch with the plain causal forward and no cache: rows are
    right-padded, so each row's next token is read at its own last position."""
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    buf = torch.full((B, int(lens.max()) + max_new), EOS, dtype=torch.long, device=device)
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
        done[act] = (nxt == EOS) | (cur[act] - lens[act] >= max_new)
    outs = []
    for i in range(B):
        ids = buf[i, int(lens[i]):int(cur[i])].tolist()
        outs.append(bytes(t for t in ids if t < 256).decode("utf-8", "replace"))
    return outs


def check(model, tok, device, tiny, n, log, batch=32):
    """Full-attention accuracy on held-out seeds, per task: chain-of-key exact match at
    each hop 1..8 (at several prompt lengths), exact match for the other tasks."""
    hops = 4 if tiny else 8
    rows = ([("chain_of_key", L, hops) for L in ((150, 220) if tiny else (1000, 2000, 4000))]
            + [("multi_key", 220 if tiny else 2000, 3 if tiny else 6),
               ("id_range", 220 if tiny else 2000, 3 if tiny else 6)])
    log("full-attention check, held-out seeds (10^6+), greedy decoding")
    log(f"{'task':14s} {'bytes':>5s} {'n':>2s} {'N':>4s}  exact  items  | chain exact match at hop 1..{hops}")
    results = {}
    for task, L, k in rows:
        exs = [tasks.make_example(task, 10**6 + i, L, k) for i in range(n)]
        outs = []
        for i in range(0, n, batch):
            chunk = exs[i:i + batch]
            outs += greedy(model, [tok.encode(e.prompt, bos=True) for e in chunk],
                           max(len(e.answer) for e in chunk) + 8, device)
        sc = [tasks.score(e, o) for e, o in zip(exs, outs)]
        ex_acc = sum(s == e.n for s, e in zip(sc, exs)) / n
        items = sum(sum(tasks.item_scores(e, o)) for e, o in zip(exs, outs)) / sum(e.n for e in exs)
        line = f"{task:14s} {L:5d} {k:2d} {n:4d}  {ex_acc:5.1%} {items:6.1%}"
        if task == "chain_of_key":
            line += "  | " + " ".join(f"{a:4.0%}" for a in tasks.hop_accuracy(sc, hops))
        log(line)
        results[(task, L)] = ex_acc
    log(f"example: {exs[0].prompt[-60:]!r} -> {outs[0][:80]!r} (gold {exs[0].answer[:80]!r})")
    return results


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    args = ap.parse_args()
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
    # workers fork before CUDA is touched
    loader = Loader(workers, args.seed, buckets, tps, depth=2 * workers + 2)
    loader.p_min = 0.55 if args.init else 0.0
    torch.manual_seed(args.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.init:  # continue training a saved checkpoint (fp32 master weights)
        model, _ = llama.load(args.init, device=device, dtype=torch.float32)
        model.train()
        margs = model.args
    else:
        margs = model_args(args.tiny)
        model = llama.Transformer(margs)
        init_weights(model)
        model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"args: {vars(args)}")
    log(f"model: {margs}")
    log(f"{n_params / 1e6:.2f}M parameters, {workers} data workers, rows {buckets}, {tps} tokens/step")
    opt = make_optimizer(model, args.lr, args.wd, device)
    attn_ctx = sdpa_context(model, device, log)
    compiled = args.compile if args.compile is not None else int(device == "cuda")
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
        toks, cls = loader.next(p)
        wait += time.time() - tw
        x = torch.from_numpy(toks.astype(np.int64))
        c = torch.from_numpy(cls)
        if device == "cuda":
            x, c = x.pin_memory().to(device, non_blocking=True), c.pin_memory().to(device, non_blocking=True)
        inp, tgt, w = x[:, :-1], x[:, 1:], weight[c[:, 1:].long()]
        lr = lr_at(step, p, args)
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            loss, ce, logits = train_step(model, inp, tgt, w, amp, attn_ctx)
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
            log(f"step {step:5d} | {el:6.1f} s | T {x.shape[1] - 1:4d} x {x.shape[0]:3d} | lr {lr:.2e} | "
                f"loss {loss.item():.4f} | answer loss {a_loss:.4f} acc {a_acc:.4f} | gnorm {gnorm:.2f} | "
                f"{rate / 1e6:.2f} Mtok/s | data wait {wait:.1f} s")
    loader.close()
    el = time.time() - t0
    log(f"trained {step} steps, {tokens / 1e6:.1f}M tokens in {el:.1f} s ({tokens / el / 1e6:.2f} Mtok/s, "
        f"data wait {wait:.1f} s)")

    # save bf16 weights (the checkpoint stays under 30 MB), then reload what was saved and check it
    tok = Tokenizer.byte_level()
    model.to(torch.bfloat16)
    llama.save(model, args.out, tok)
    del model, opt
    size = os.path.getsize(os.path.join(args.out, "model.safetensors")) / 1e6
    log(f"saved {args.out} (model.safetensors {size:.1f} MB)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m, tok = llama.load(args.out, device=device, dtype=dtype)
    tc = time.time()
    with attn_ctx():
        check(m, tok, device, args.tiny, args.check_n or (8 if args.tiny else 48), log)
    log(f"check took {time.time() - tc:.1f} s; total wall time {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
