"""GPU time of each piece of a decode step's bookkeeping and small ops at one length (Llama-3.1-8B attention shapes).

    python tools/time_ops.py --length 131072          (one H100)

Each row is the mean of --reps replays of a CUDA graph holding --inner calls, so launch
overhead from Python is not in it; it is what one layer pays per call inside a graph.
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
import policies  # noqa: E402
from kernels import decode_attention  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=131072)
p.add_argument("--reps", type=int, default=20)
p.add_argument("--inner", type=int, default=10)
args = p.parse_args()

H, Hkv, D, T = 32, 8, 128, args.length
N, K = T + 256, T // 8
torch.manual_seed(0)
q = torch.randn(H, D, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(Hkv, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
pos = torch.tensor([T - 1], device="cuda")
probs = decode_attention(q, k, v, pos, None, True)[1]
pol = policies.RefreshKV(K)
pol.prefill(0, q[:, None].expand(-1, 64, -1), k, q[:, None].expand(-1, 64, -1))  # state for refresh/join
idx = torch.stack([torch.randperm(T - 1, device="cuda")[:K] for _ in range(Hkv)])  # a real L/8 selection
x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
nw = torch.randn(4096, device="cuda", dtype=torch.bfloat16)  # a norm's weight
qkv = torch.randn((H + 2 * Hkv) * D, device="cuda", dtype=torch.bfloat16)
cos, sin = torch.randn(2, D, device="cuda", dtype=torch.bfloat16)
gu = torch.randn(2 * 14336, device="cuda", dtype=torch.bfloat16)


def weights(n, k, copies=6):
    """A weight [n, k] of a decode step's products, a different one of `copies` at each call, so
    that the calls in one graph read from memory, as a step's 32 layers do, not from L2."""
    ws = itertools.cycle([torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)])
    return lambda: next(ws)


wqkv, wo, w13, w2, lm = weights(6144, 4096), weights(4096, 4096), weights(28672, 4096), weights(4096, 14336), \
    weights(128256, 4096, 2)
count = torch.zeros(4, dtype=torch.long, device="cuda")
flag = torch.zeros(1, dtype=torch.int64, device="cuda")  # as similarity_check makes it
hprobs = decode_attention(q, k, v, pos, idx, True)[1]  # h2o's step: the sparse pass's probabilities
kept, acc = idx.clone(), torch.rand(Hkv, K, device="cuda")
qr, q_mean = torch.randn(H, D, device="cuda", dtype=torch.bfloat16), torch.randn(D, device="cuda")

OPS = {
    "dense attention + scores (kernel)": lambda: decode_attention(q, k, v, pos, None, True),
    "dense attention, no scores": lambda: decode_attention(q, k, v, pos, None, False),
    "sparse attention L/8": lambda: decode_attention(q, k, v, pos, idx, False),
    "sparse attention L/8, counted in the kernel": lambda: decode_attention(q, k, v, pos, idx, False, count=count),
    "check step, flag 0 (sparse pass)": lambda: decode_attention(q, k, v, pos, idx, True, full=flag),
    "refresh: torch reference (group max, pool, topk)": lambda: kernels.pooled_top(probs, Hkv, 7, K, pos, kernel="torch"),
    "refresh: pooled_top (Triton)": lambda: kernels.pooled_top(probs, Hkv, 7, K, pos),
    "refresh: pooled_top, flag 0 (skipped)": lambda: kernels.pooled_top(probs, Hkv, 7, K, pos, out=(pol.small[0], pol.rank[0]), flag=flag),
    "refresh: whole (policy, from probs)": lambda: pol.refresh(0, probs, q, pos),
    "partial: join + evict": lambda: pol.join(0, pos),
    "partial: masked join (check step)": lambda: pol.join(0, pos, flag),
    "sparse attention L/8 + scores (h2o's step)": lambda: decode_attention(q, k, v, pos, idx, True),
    "h2o: update (PyTorch ops)": lambda: kernels.h2o_update(hprobs, kept, acc, pos, K // 2, kernel="torch"),
    "h2o: update (kernels.h2o_update)": lambda: kernels.h2o_update(hprobs, kept, acc, pos, K // 2),
    "check: similarity (PyTorch ops)": lambda: kernels.similarity_check(qr, q_mean, 0.85, kernel="torch"),
    "check: similarity (kernels.similarity_check)": lambda: kernels.similarity_check(qr, q_mean, 0.85),
    "rope + cache write (kernels.rope_cache_write)": lambda: kernels.rope_cache_write(qkv, cos, sin, k, v, pos, H),
    "wqkv 6144x4096: F.linear (cuBLAS)": lambda: torch.nn.functional.linear(x, wqkv()),
    "wqkv: norm + product (kernels.linear)": lambda: kernels.linear(x, wqkv(), nw),
    "wo 4096x4096: F.linear (cuBLAS)": lambda: torch.nn.functional.linear(x, wo()),
    "wo: product + residual (kernels.linear)": lambda: kernels.linear(x, wo(), residual=x),
    "w13 28672x4096: F.linear (cuBLAS)": lambda: torch.nn.functional.linear(x, w13()),
    "w13: norm + product (kernels.linear)": lambda: kernels.linear(x, w13(), nw),
    "w2 4096x14336: F.linear (cuBLAS)": lambda: torch.nn.functional.linear(gu[None, None, :14336], w2()),
    "w2: silu * up + product + residual (kernels.linear)": lambda: kernels.linear(gu, w2(), silu=True, residual=x),
    "lm_head 128256x4096: F.linear (cuBLAS)": lambda: torch.nn.functional.linear(x, lm()),
    "lm_head: norm + product (kernels.linear)": lambda: kernels.linear(x, lm(), nw),
}
print(f"| op (L={T}, K={K}) | us per call |\n|---|---|")
for name, fn in OPS.items():
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(args.inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    print(f"| {name} | {1e3 * start.elapsed_time(end) / args.reps / args.inner:.1f} |", flush=True)
