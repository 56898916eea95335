"""Per-layer decode attention timings against their byte floors (a script, not a test).

GPU:  python bench_attention.py [--sweep] [--quick] [--prefill] [--ctx 65536 131072] [--out DIR]
      Llama-3.1-8B shapes (32 q heads, 8 KV heads, head dim 128, bf16, batch 1),
      contexts 4K..128K, index budgets L/8 and L/32, sorted and unsorted indices.
      --quick: only SDPA dense, the full step with scores and sparse L/8 (unsorted).
      --prefill: H2O's prompt column sums (kernels.column_scores) against causal SDPA over the
      prompt, per layer, seconds (no decode rows); with --sweep, each pass's tiles first.
CPU:  python bench_attention.py --cpu   (tiny shapes, Triton interpreter: checks it runs)

A context T is a cache buffer of T + 256 positions with the current token at pos = T - 1,
pos a one-element tensor on the device (as the model passes it); the tail is never read.
Each correctness check also captures the Triton call at pos in a CUDA graph and replays it
at pos // 2 against the reference (one graph serves every position).

Two times per path, medians:
  GPU µs:   20 calls captured in a CUDA graph, replayed 10 times: the device time alone.
  eager µs: triton.testing.do_bench (L2 flushed between calls): includes the Python and
            launch cost whenever that is longer than the device time.
Inputs rotate among several caches and index sets so that no call finds its data in L2.
Floor = the bytes a path must move (each input read once, each output written once)
divided by the device-to-device copy bandwidth measured in the same run.
--sweep first times the sparse kernel's launch configs and the refresh selection's programs and
block at the two longest contexts and uses the best for the table.
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
import torch.nn.functional as F

import kernels
from kernels import attention_triton, decode_attention

p = argparse.ArgumentParser()
p.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (smoke test)")
p.add_argument("--sweep", action="store_true", help="tune launch configs first (GPU)")
p.add_argument("--quick", action="store_true", help="SDPA, full step + scores and sparse L/8 only")
p.add_argument("--prefill", action="store_true", help="time H2O's prompt column sums instead")
p.add_argument("--ctx", type=int, nargs="+", help="contexts (default 4K 16K 64K 128K; CPU 256 512)")
p.add_argument("--out", default=os.environ.get("OUT", "."), help="where to write the table and log")
args = p.parse_args()
if not args.cpu and not torch.cuda.is_available():
    sys.exit("bench_attention.py: no GPU; use --cpu for the small CPU version")
try:
    os.makedirs(args.out, exist_ok=True)
except OSError as e:
    sys.exit(print(f"bench_attention.py: --out {args.out}: cannot make the directory ({e.strerror})",
                   file=sys.stderr) or 2)

DEV = "cpu" if args.cpu else "cuda"
H, HKV, D = (8, 2, 32) if args.cpu else (32, 8, 128)
DT = torch.float32 if args.cpu else torch.bfloat16
CTXS = args.ctx or ([256, 512] if args.cpu else [4096, 16384, 65536, 131072])
ESZ = torch.finfo(DT).bits // 8
L2 = torch.cuda.get_device_properties(0).L2_cache_size if DEV == "cuda" else 0
LOG = open(os.path.join(args.out, "bench_log.txt"), "w")


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def bench_eager(fn):
    """Median microseconds per call, timed call by call (do_bench on GPU)."""
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


def bench_graph(fn, n=20, reps=10):
    """Median microseconds per call of n calls captured in one CUDA graph (device time)."""
    if DEV != "cuda":
        return bench_eager(fn)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(1e3 * a.elapsed_time(b) / n)
    del g
    return statistics.median(ts)


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 28) if DEV == "cuda" else (1 << 22)
    x = torch.randn(n, device=DEV, dtype=torch.float32)
    y = torch.empty_like(x)
    us = bench_eager(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (us * 1e-6)


def cycle(items):
    """A function returning the next item on each call."""
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return nxt


def copies(nbytes):
    """How many input sets make the working set at least 4x the L2 cache (at most 8)."""
    return min(8, max(1, math.ceil(4 * L2 / nbytes)))


def make_cache(T):
    """q [H, D]; k, v [HKV, T+256, D] cache buffers; pos = T-1 as a tensor on the device."""
    q = torch.randn(H, D, device=DEV).to(DT)
    k = torch.randn(HKV, T + 256, D, device=DEV).to(DT)
    v = torch.randn(HKV, T + 256, D, device=DEV).to(DT)
    return q, k, v, torch.tensor([T - 1], device=DEV)


def sdpa(q, k, v, pos, T):
    """Dense attention through torch SDPA (GQA without copies) on the host-sliced [:, :T]:
    the baseline; it needs the length on the host, so one graph cannot serve every position."""
    out = F.scaled_dot_product_attention(q[None, :, None], k[None, :, :T], v[None, :, :T],
                                         enable_gqa=True)
    return out[0, :, 0], None


def make_idx(T, n, sort):
    """n distinct random positions in [0, T-1) per KV head, int32."""
    idx = torch.rand(HKV, T - 1, device=DEV).argsort(dim=1)[:, :n]
    idx = idx.sort(dim=1).values if sort else idx
    return idx.to(torch.int32).contiguous()


def check(a, b, tol=3e-2):
    err = (a.float() - b.float()).abs().max().item()
    return "ok" if err <= tol and not math.isnan(err) else f"MISMATCH {err:.3g}"


def replay_check(q, k, v, pos, idx):
    """Capture the Triton call (with scores) at pos in a CUDA graph, replay it at pos // 2
    (idx's slots at or past the new pos emptied to -1), compare with the reference there.
    On CPU the second position is a plain call."""
    fn = lambda: decode_attention(q, k, v, pos, idx, scores=True, kernel="triton")
    fn()                                                           # compiles outside the capture
    if DEV == "cuda":
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out, probs = fn()
    saved = (pos.clone(), None if idx is None else idx.clone())
    pos //= 2
    if idx is not None:
        idx.masked_fill_(idx >= pos, -1)
    if DEV == "cuda":
        g.replay()
    else:
        out, probs = fn()
    ref, pref = decode_attention(q, k, v, pos, idx, scores=True, kernel="torch")
    res = f"at pos {int(pos)}: {check(out, ref)}, probs {check(probs, pref, 1e-3)}"
    pos.copy_(saved[0])
    if idx is not None:
        idx.copy_(saved[1])
    return res


def sweep():
    """Time the sparse kernel's launch configs (L/8 unsorted; block_n, warps, stages, splits, and
    idx's next block read ahead or not; the combine kernel launched early, PDL) at the two longest
    contexts and keep the least total; the one config serves the dense launches too."""
    combos = [(32, 4, 2), (64, 2, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2)]
    sparse = {}
    for T in CTXS[-2:]:
        caches = cycle([make_cache(T) for _ in range(copies(2 * HKV * T * D * ESZ))])
        idxs = cycle([make_idx(T, T // 8, False) for _ in range(8)])
        log(f"sweep T={T}, sparse L/8 (block_n, warps, stages, prefetch; splits: GPU us)")
        for bn, w, st in combos:
            for pf in (False, True):
                times = []
                for sp in (48, 64, 80, 128, 256):
                    cfg = dict(block_n=bn, num_warps=w, num_stages=st, num_splits=sp, pdl=True, prefetch=pf)
                    t = bench_graph(lambda: attention_triton(*caches(), idxs(), **cfg))
                    times.append(f"{sp}: {t:.1f}")
                    sparse.setdefault((bn, w, st, sp, pf), []).append(t)
                log(f"  {bn:>4} {w} {st} prefetch {pf:d}: " + "  ".join(times))
    ranked = sorted((sum(t), key) for key, t in sparse.items())
    log("best 5 (sum over the contexts): " + "; ".join(f"{k} {t:.1f}" for t, k in ranked[:5]))
    bn, w, st, sp, pf = ranked[0][1]
    kernels.CUDA_CONFIG.update(block_n=bn, num_warps=w, num_stages=st, splits=sp, pdl=True, prefetch=pf)
    log(f"chosen: {kernels.CUDA_CONFIG}\n")


def sweep_select():
    """The refresh selection's programs per KV head and block (kernels.SELECT_CONFIG) at the two
    longest contexts, on a full step's probabilities; keeps the least sum over the contexts of the
    time over that context's best, so that 8K's ~25 us weighs as much as 128K's ~57."""
    configs = [(64, 1024), (128, 512), (128, 256), (64, 256), (256, 256)]
    got = {}
    for T in CTXS[-2:]:
        q, k, v, pos = make_cache(T)
        probs = decode_attention(q, k, v, pos, scores=True, kernel="triton")[1]
        ref = kernels.pooled_top(probs, HKV, 7, T // 8, pos, kernel="torch")[1].sort(1).values
        times = []
        for programs, block in configs:
            kernels.SELECT_CONFIG = dict(programs=programs, block=block)
            same = torch.equal(kernels.pooled_top(probs, HKV, 7, T // 8, pos)[1].sort(1).values, ref)
            t = bench_graph(lambda: kernels.pooled_top(probs, HKV, 7, T // 8, pos)) if same else math.inf
            times.append(f"{programs}x{block}: {t:.1f}")
            got.setdefault((programs, block), []).append(t)
        log(f"sweep T={T}, refresh select L/8 (programs x block: GPU us; inf: not the reference's scores) "
            + "  ".join(times))
        del q, k, v, pos, probs
    best = [min(t[i] for t in got.values()) for i in range(len(CTXS[-2:]))]
    programs, block = min(got, key=lambda c: sum(t / b for t, b in zip(got[c], best)))
    kernels.SELECT_CONFIG = dict(programs=programs, block=block)
    log(f"chosen: SELECT_CONFIG {kernels.SELECT_CONFIG}\n")


def time_once(fn, reps=3):
    """Median seconds of reps calls, each timed alone (long calls: no graph needed)."""
    fn()
    ts = []
    for _ in range(reps):
        if DEV == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def prefill_rows():
    """H2O's prompt column sums against causal SDPA over the same prompt (one layer), seconds;
    with --sweep the Triton tiles of each pass are chosen at the shortest context first (GPU)."""
    def inputs(T):
        return (torch.randn(H, T, D, device=DEV).to(DT), torch.randn(HKV, T, D, device=DEV).to(DT),
                torch.randn(HKV, T, D, device=DEV).to(DT))
    if DEV == "cuda" and args.sweep:
        q, k, _ = inputs(CTXS[0])
        import triton
        cfg = kernels.COLUMN_CONFIG
        for p in ("rows", "columns"):  # one pass's tiles at a time, the other pass's as configured
            best = {}
            for tiles in ((64, 64, 4), (64, 128, 8), (128, 64, 8), (128, 128, 8)):
                try:
                    t = time_once(lambda: kernels.column_scores_triton(q, k, **dict(cfg, **{p: tiles})))
                except triton.runtime.errors.OutOfResources:
                    log(f"column_scores {p} tiles {tiles}: do not fit")
                    continue
                best[tiles] = t
                log(f"column_scores {p} tiles (block_q, block_k, warps) {tiles}: {1e3 * t:.2f} ms at {CTXS[0]} (both passes)")
            cfg[p] = min(best, key=best.get)
        log(f"chosen: {cfg}")
    table = ["| context | causal SDPA s | column_scores s | ÷ SDPA | torch reference s | max abs diff |",
             "|---:|---:|---:|---:|---:|---:|"]
    for T in CTXS:
        q, k, v = inputs(T)
        kx, vx = (x.repeat_interleave(H // HKV, 0)[None] for x in (k, v))  # GQA as copies: flash on any torch
        sd = time_once(lambda: F.scaled_dot_product_attention(q[None], kx, vx, is_causal=True))
        del kx, vx
        tri = time_once(lambda: kernels.column_scores(q, k))     # CPU: the torch reference
        ref, diff = "—", "—"
        if T <= 16384:  # the reference holds [H, 256, T] float32 blocks: slow past that
            ref = f"{time_once(lambda: kernels.column_scores_torch(q, k), reps=1):.3f}"
            diff = f"{(kernels.column_scores(q, k) - kernels.column_scores_torch(q, k)).abs().max().item():.2g}"
        table.append(f"| {T} | {sd:.3f} | {tri:.3f} | {tri / sd:.2f} | {ref} | {diff} |")
        log(table[-1])
        del q, k, v
    table = "\n".join(table)
    log(f"\n{table}")
    with open(os.path.join(args.out, "bench_prefill.md"), "w") as f:
        f.write(f"{DEV}; column_scores config {kernels.COLUMN_CONFIG}\n\n{table}\n")


bw = copy_bandwidth()
log(f"device: {torch.cuda.get_device_name(0) if DEV == 'cuda' else 'cpu'}; torch {torch.__version__}; "
    f"triton {kernels.triton.__version__ if kernels.triton else None}; copy bandwidth {bw / 1e12:.3f} TB/s")
if args.prefill:
    prefill_rows()
    sys.exit(0)
if args.sweep and DEV == "cuda":
    sweep()
    sweep_select()
floor = lambda nbytes: 1e6 * nbytes / bw                           # microseconds
qo = 2 * H * D * ESZ                                               # q read + out written
rows = []                                                          # (T, path, n_att, gpu, eager, floor)


def row(T, path, n_att, fn, nbytes):
    gpu, eager = bench_graph(fn), bench_eager(fn)
    rows.append((T, path, n_att, gpu, eager, floor(nbytes)))
    log(f"T={T:>6} {path:<36} n_att={n_att:>6} GPU {gpu:8.1f} us  eager {eager:8.1f} us  "
        f"floor {floor(nbytes):7.1f} us")


for T in CTXS:
    kv_bytes = 2 * HKV * T * D * ESZ                               # K and V, positions 0..pos
    probs_bytes = 4 * H * (T + 256)                                # dense probs: the whole buffer
    caches = cycle([make_cache(T) for _ in range(copies(kv_bytes))])
    q, k, v, pos = caches()
    # correctness first, on these very inputs
    ref, pref = decode_attention(q, k, v, pos, scores=True, kernel="torch")
    out, pt = decode_attention(q, k, v, pos, scores=True, kernel="triton")
    sd, _ = sdpa(q, k, v, pos, T)
    log(f"T={T}: dense triton vs torch {check(out, ref)}, probs {check(pt, pref, 1e-3)}, "
        f"sdpa {check(sd, ref)}; replayed {replay_check(q, k, v, pos, None)}")
    del ref, pref, out, pt, q, k, v, pos
    row(T, "dense SDPA (enable_gqa)", T, lambda: sdpa(*caches(), T), kv_bytes + qo)
    if not args.quick:
        row(T, "dense Triton, no scores", T,
            lambda: decode_attention(*caches(), kernel="triton"), kv_bytes + qo)
    row(T, "full step + scores, Triton", T,
        lambda: decode_attention(*caches(), scores=True, kernel="triton"),
        kv_bytes + qo + probs_bytes)
    if T <= 16384 and not args.quick:  # the float32 reference copies the whole cache: slow
        row(T, "full step + scores, torch ref", T,
            lambda: decode_attention(*caches(), scores=True, kernel="torch"),
            kv_bytes + qo + probs_bytes)
    for budget in ((8,) if args.quick else (8, 32)):
        n = T // budget
        sp_bytes = 2 * HKV * (n + 1) * D * ESZ + HKV * n * 4 + qo  # gathered rows + int32 idx
        for sort in ((False,) if args.quick else (True, False)):
            tag = f"L/{budget} {'sorted' if sort else 'unsorted'}"
            idxs = cycle([make_idx(T, n, sort) for _ in range(copies(sp_bytes))])
            q, k, v, pos = caches()
            i0 = idxs()
            ref, pref = decode_attention(q, k, v, pos, i0, scores=True, kernel="torch")
            out, pt = decode_attention(q, k, v, pos, i0, scores=True, kernel="triton")
            log(f"T={T} {tag}: sparse triton vs torch {check(out, ref)}, "
                f"probs {check(pt, pref, 1e-3)}; replayed {replay_check(q, k, v, pos, i0)}")
            del q, k, v, pos, ref, pref, out, pt
            row(T, f"sparse Triton {tag}", n + 1,
                lambda: decode_attention(*caches(), idxs(), kernel="triton"), sp_bytes)
            if args.quick:
                continue
            row(T, f"sparse torch fallback {tag}", n + 1,
                lambda: decode_attention(*caches(), idxs(), kernel="torch"), sp_bytes)
            if not sort:
                row(T, f"sparse Triton + scores {tag}", n + 1,
                    lambda: decode_attention(*caches(), idxs(), scores=True, kernel="triton"),
                    sp_bytes + 4 * H * (n + 1))
    # the similarity schedule's check step: one launch, a device flag picks the pass
    n = T // 8
    idxs = cycle([make_idx(T, n, False) for _ in range(4)])
    for flag in (1, 0):
        full = torch.tensor([flag], device=DEV)
        what = "full step + scores" if flag else "sparse L/8 unsorted"
        row(T, f"flag={flag}: {what}", T if flag else n + 1,
            lambda: decode_attention(*caches(), idxs(), scores=True, kernel="triton", full=full),
            (kv_bytes + probs_bytes if flag else 2 * HKV * (n + 1) * D * ESZ + HKV * n * 4) + qo)
    # the refresh: pooled group max and top-K of a full step's probs
    q, k, v, pos = caches()
    probs = decode_attention(q, k, v, pos, scores=True, kernel="triton")[1]
    sel_bytes = probs_bytes + 12 * HKV * n                          # probs read; positions, scores written
    for kind in ("triton", "torch"):
        row(T, f"refresh select L/8 ({kind})", T,
            lambda: kernels.pooled_top(probs, HKV, 7, n, pos, kernel=kind), sel_bytes)
    out = kernels.pooled_top(probs, HKV, 7, n, pos)
    ref = kernels.pooled_top(probs, HKV, 7, n, pos, kernel="torch")
    same = torch.equal(out[1].sort(1).values, ref[1].sort(1).values)
    log(f"T={T}: refresh select triton vs torch: {'same scores' if same else 'MISMATCH'}")
    zero = torch.zeros(1, dtype=torch.int32, device=DEV)
    row(T, "refresh select, flag=0 (skipped)", 0,
        lambda: kernels.pooled_top(probs, HKV, 7, n, pos, out=out, flag=zero), 4 * HKV * 2048 * 3)
    del q, k, v, pos, probs, out, ref
    empty = torch.zeros(HKV, 0, dtype=torch.int32, device=DEV)
    if not args.quick:
        row(T, "sparse Triton n=0 (fixed cost)", 1,
            lambda: decode_attention(*caches(), empty, kernel="triton"), 2 * HKV * D * ESZ + qo)
    del caches

sdpa_us = {T: gpu for T, path, _, gpu, _, _ in rows if path.startswith("dense SDPA")}
table = ["| context | path | attended/head | GPU µs | eager µs | byte floor µs | GPU ÷ floor | SDPA dense ÷ this (GPU) |",
         "|---:|---|---:|---:|---:|---:|---:|---:|"]
for T, path, n_att, gpu, eager, fl in rows:
    table.append(f"| {T} | {path} | {n_att} | {gpu:.1f} | {eager:.1f} | {fl:.1f} | {gpu / fl:.2f} | {sdpa_us[T] / gpu:.2f} |")
table = "\n".join(table)
log(f"\nconfig: {kernels.CUDA_CONFIG}, select {kernels.SELECT_CONFIG}\ncopy bandwidth {bw / 1e12:.3f} TB/s\n\n{table}")
with open(os.path.join(args.out, "bench_table.md"), "w") as f:
    f.write(f"copy bandwidth {bw / 1e12:.3f} TB/s, {DEV}; config {kernels.CUDA_CONFIG}, select {kernels.SELECT_CONFIG}\n\n{table}\n")
