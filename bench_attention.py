"""Per-layer decode attention timings against their byte floors (a script, not a test).

GPU:  python bench_attention.py [--sweep] [--out DIR]
      Llama-3.1-8B shapes (32 q heads, 8 KV heads, head dim 128, bf16, batch 1),
      contexts 4K..128K, index budgets L/8 and L/32, sorted and unsorted indices.
CPU:  python bench_attention.py --cpu   (tiny shapes, Triton interpreter: checks it runs)

Floor = the bytes a path must move (each input read once, each output written once)
divided by the device-to-device copy bandwidth measured in the same run.
"""
import argparse
import math
import os
import statistics
import sys
import time

if "--cpu" in sys.argv:  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

import kernels
from kernels import attention_triton, decode_attention

p = argparse.ArgumentParser()
p.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (smoke test)")
p.add_argument("--sweep", action="store_true", help="also sweep Triton launch configs at the longest context")
p.add_argument("--out", default=os.environ.get("OUT", "."), help="where to write the table and log")
args = p.parse_args()

DEV = "cpu" if args.cpu else "cuda"
H, HKV, D = (8, 2, 32) if args.cpu else (32, 8, 128)
DT = torch.float32 if args.cpu else torch.bfloat16
CTXS = [256, 512] if args.cpu else [4096, 16384, 65536, 131072]
ESZ = torch.finfo(DT).bits // 8
LOG = open(os.path.join(args.out, "bench_log.txt"), "w")


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def bench(fn):
    """Median time of fn in microseconds (CUDA events via do_bench on GPU)."""
    if DEV == "cuda":
        import triton
        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 28) if DEV == "cuda" else (1 << 22)
    x = torch.randn(n, device=DEV, dtype=torch.float32)
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (us * 1e-6)


def rotating(make_inputs, nbytes):
    """Several input sets if one fits in L2 (do_bench also flushes L2 between calls)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if DEV == "cuda" else 0
    sets = [make_inputs() for _ in range(min(8, max(1, math.ceil(4 * l2 / nbytes))))]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]
    return next_set


def make_cache(T):
    """q [H, D] and k, v as views [:, :T] of a preallocated [HKV, T+256, D] cache."""
    q = torch.randn(H, D, device=DEV).to(DT)
    kb = torch.randn(HKV, T + 256, D, device=DEV).to(DT)
    vb = torch.randn(HKV, T + 256, D, device=DEV).to(DT)
    return q, kb[:, :T], vb[:, :T]


def make_idx(T, n, sort):
    """n distinct random positions in [0, T-1) per KV head, int32."""
    idx = torch.rand(HKV, T - 1, device=DEV).argsort(dim=1)[:, :n]
    idx = idx.sort(dim=1).values if sort else idx
    return idx.to(torch.int32).contiguous()


def check(a, b, tol=3e-2):
    err = (a.float() - b.float()).abs().max().item()
    return "ok" if err <= tol and not math.isnan(err) else f"MISMATCH {err:.3g}"


bw = copy_bandwidth()
log(f"device: {torch.cuda.get_device_name(0) if DEV == 'cuda' else 'cpu'}; torch {torch.__version__}; "
    f"triton {kernels.triton.__version__ if kernels.triton else None}; copy bandwidth {bw / 1e12:.3f} TB/s")
floor = lambda nbytes: 1e6 * nbytes / bw                           # microseconds
qo = 2 * H * D * ESZ                                               # q read + out written
rows = []                                                          # (ctx, path, n_att, us, floor_us)


def row(T, path, n_att, us, nbytes, note=""):
    rows.append((T, path, n_att, us, floor(nbytes)))
    log(f"T={T:>6} {path:<34} n_att={n_att:>6} {us:9.1f} us  floor {floor(nbytes):8.1f} us  {note}")


for T in CTXS:
    kv_bytes = 2 * HKV * T * D * ESZ                               # K and V, all positions
    nxt = rotating(lambda: make_cache(T), kv_bytes)
    q, k, v = nxt()
    # correctness first, on these very inputs
    ref, pref = decode_attention(q, k, v, scores=True, kernel="torch")
    out, pt = decode_attention(q, k, v, scores=True, kernel="triton")
    sd, _ = kernels._sdpa(q, k, v)
    log(f"T={T}: dense triton vs torch {check(out, ref)}, probs {check(pt, pref, 1e-3)}, sdpa {check(sd, ref)}")
    del ref, pref, out, pt

    def dense(kind, scores):
        def fn():
            q, k, v = nxt()
            if kind == "sdpa":
                return kernels._sdpa(q, k, v)
            return decode_attention(q, k, v, scores=scores, kernel=kind)
        return bench(fn)
    sdpa_us = dense("sdpa", False)
    row(T, "dense SDPA (enable_gqa)", T, sdpa_us, kv_bytes + qo)
    row(T, "dense Triton, no scores", T, dense("triton", False), kv_bytes + qo)
    row(T, "dense Triton, no scores, 2 launches", T,
        bench(lambda: attention_triton(*nxt(), fused=False)), kv_bytes + qo)
    row(T, "full step + scores, Triton", T, dense("triton", True), kv_bytes + qo + 4 * H * T)
    if T <= 16384 or DEV == "cpu":  # the float32 reference copies the whole cache: slow
        row(T, "full step + scores, torch ref", T, dense("torch", True), kv_bytes + qo + 4 * H * T)
    for budget in (8, 32):
        n = T // budget
        sp_bytes = 2 * HKV * (n + 1) * D * ESZ + HKV * n * 4 + qo  # gathered rows + int32 idx
        for sort in (True, False):
            tag = f"L/{budget} {'sorted' if sort else 'unsorted'}"
            idxs = [make_idx(T, n, sort) for _ in range(2)]
            q, k, v = nxt()
            ref, pref = decode_attention(q, k, v, idxs[0], scores=True, kernel="torch")
            out, pt = decode_attention(q, k, v, idxs[0], scores=True, kernel="triton")
            log(f"T={T} {tag}: sparse triton vs torch {check(out, ref)}, probs {check(pt, pref, 1e-3)}")

            def sparse(kind, scores=False):
                def fn():
                    q, k, v = nxt()
                    return decode_attention(q, k, v, idxs[0], scores=scores, kernel=kind)
                return bench(fn)
            row(T, f"sparse Triton {tag}", n + 1, sparse("triton"), sp_bytes)
            row(T, f"sparse torch fallback {tag}", n + 1, sparse("torch"), sp_bytes)
            if not sort:
                row(T, f"sparse Triton {tag}, 2 launches", n + 1,
                    bench(lambda: attention_triton(*nxt(), idxs[0], fused=False)), sp_bytes)
                row(T, f"sparse Triton + scores {tag}", n + 1, sparse("triton", True),
                    sp_bytes + 4 * H * (n + 1))
    empty = torch.zeros(HKV, 0, dtype=torch.int32, device=DEV)
    row(T, "sparse Triton n=0 (launch cost)", 1,
        bench(lambda: decode_attention(q, k, v, empty, kernel="triton")), 2 * HKV * D * ESZ + qo)
    del q, k, v, nxt

if args.sweep and DEV == "cuda":
    T = CTXS[-1]
    q, k, v = make_cache(T)
    idx = make_idx(T, T // 8, False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    log(f"\nsweep at T={T} (block_n, warps, stages, splits): sparse L/8 unsorted fused | "
        "same, 2 launches | full step + scores")
    for bn, w, s in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2)]:
        for sp in (16, 32, 64, 128):
            cfg = dict(block_n=bn, num_warps=w, num_stages=s, num_splits=sp)
            try:
                a = bench(lambda: attention_triton(q, k, v, idx, **cfg))
                a2 = bench(lambda: attention_triton(q, k, v, idx, fused=False, **cfg))
                b = bench(lambda: attention_triton(q, k, v, None, True, **cfg))
                log(f"  {bn:>4} {w} {s} {sp:>4}: {a:8.1f} us | {a2:8.1f} us | {b:8.1f} us")
            except Exception as e:  # e.g. out of shared memory
                log(f"  {bn:>4} {w} {s} {sp:>4}: failed {type(e).__name__}: {str(e)[:80]}")

sdpa = {T: us for T, path, _, us, _ in rows if path.startswith("dense SDPA")}
table = ["| context | path | attended/head | median µs | byte floor µs | × floor | SDPA dense ÷ this |",
         "|---:|---|---:|---:|---:|---:|---:|"]
for T, path, n_att, us, fl in rows:
    table.append(f"| {T} | {path} | {n_att} | {us:.1f} | {fl:.1f} | {us / fl:.2f} | {sdpa[T] / us:.2f} |")
table = "\n".join(table)
log("\n" + table)
with open(os.path.join(args.out, "bench_table.md"), "w") as f:
    f.write(f"copy bandwidth {bw / 1e12:.3f} TB/s, {DEV}\n\n{table}\n")
