"""Decode attention for one query token (batch 1): a PyTorch reference and Triton kernels.

decode_attention(q, k, v, pos, idx=None, scores=False, kernel="auto") -> (out, probs)
  q [H, D]; k/v [Hkv, N, D] the cache (views of a larger buffer are fine), positions 0..pos filled;
  pos a one-element integer tensor on the device: the current token's position. It is read on
  the device only (no host sync), so a decode step can be captured once in a CUDA graph and
  replayed at every position. idx [Hkv, n] or None; entries < 0 in idx are empty slots, skipped.
  The current token (position pos) is always attended, as the last attended entry.

The Triton path is split-KV ("flash-decoding"): program (kv head, split) walks one chunk
of the attended entries, loads each K/V row once for the whole GQA group (the group's
query heads are packed into one tl.dot), keeps an online softmax in float32 and writes a
partial (max, sum, acc). A second small kernel merges the splits and, if asked, turns
the scaled logits the first kernel wrote into probabilities with the final log-sum-exp.
count= adds the step and the attended positions to counters inside the kernel; full= (a
device flag) makes one launch attend to every position or to idx, so a per-layer decision
needs no host read.

Also here, each with a PyTorch reference:
  pooled_top(probs, n_kv, pool, k, last)  the refresh's selection: group max, max-pool, top-K
                                          (a radix select on the float bits, no sort)
  column_scores(q, k)                     h2o's prompt scores: causal-softmax column sums of the
                                          group's max, in two passes over tiles
  join(idx, rank, pos, flag)              a RefreshKV partial step's join: the lowest-ranked slot
                                          takes the current token (one launch)
  h2o_update(probs, kept, acc, pos, recent)  H2O's step: scores accumulated, the lightest non-recent
                                          slot takes the current token (two launches)
  similarity_check(q_raw, q_mean, threshold)  the similarity schedule's per-layer flag (one launch)
  linear(x, w, norm, silu, residual)      one token's weight product with the norm, silu * up or
                                          the residual add fused in (model.fused_step)
  rope_cache_write(qkv, cos, sin, ...)    rotary embedding and the cache write in one launch
"""
import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: "torch" and CPU "auto" still work
    triton = None
try:  # programmatic dependent launch (Hopper): the combine kernel starts before the split pass ends
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import, too
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- reference

def use_triton(kernel, device):
    """Every entry point's `kernel`: "torch" (the reference), "triton", or "auto" (Triton on CUDA when
    it is installed). True: launch the Triton kernel; a request it cannot serve is a ValueError."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel must be 'torch', 'triton' or 'auto', got {kernel!r}")
    if kernel == "auto":
        return device.type == "cuda" and triton is not None
    if kernel == "triton" and triton is None:
        raise ValueError("kernel='triton' needs the triton package")
    if kernel == "triton" and device.type != "cuda" and not INTERPRET:
        raise ValueError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return kernel == "triton"


def attention_torch(q, k, v, pos, idx=None, scores=False):
    """Readable reference: gather, float32 matmul on a [Hkv, G, D] view, masked softmax, matmul.
    One code path whatever `scores` is, so `out` is bitwise the same either way."""
    H, D = q.shape
    Hkv, N, _ = k.shape
    if idx is None:  # every position 0..pos; the rest of the buffer is masked out
        attended = torch.arange(N, device=k.device).expand(Hkv, N)
        ok = attended <= pos
    else:  # idx's order, then the current token; empty slots masked out
        attended = torch.cat([idx.long(), pos.view(1, 1).expand(Hkv, 1)], dim=1)  # [Hkv, n+1]
        ok = attended >= 0
        at = attended.clamp(min=0)[:, :, None].expand(-1, -1, D)
        k, v = k.gather(1, at), v.gather(1, at)
    qg = q.view(Hkv, H // Hkv, D).float()                          # [Hkv, G, D]
    att = qg @ k.float().transpose(1, 2) / math.sqrt(D)            # [Hkv, G, n_att]
    p = att.masked_fill(~ok[:, None], float("-inf")).softmax(dim=-1)
    out = (p @ v.float().masked_fill(~ok[:, :, None], 0.0)).reshape(H, D).to(q.dtype)  # [H, D]
    return out, (p.reshape(H, -1) if scores else None)


# ----------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _merge(m_ptr, l_ptr, acc_ptr, out_ptr, h, S, D: tl.constexpr, BLOCK_S: tl.constexpr):
        """Merge the S partials of query head h into out[h]; returns (max, sum), base 2."""
        sp = tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        m = tl.load(m_ptr + h * S + sp, mask=sp < S, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_ptr + h * S + sp, mask=sp < S, other=0.0, cache_modifier=".cg")
        acc = tl.load(acc_ptr + (h * S + sp[:, None]) * D + d[None, :],
                      mask=(sp < S)[:, None], other=0.0, cache_modifier=".cg")  # [BLOCK_S, D]
        m_max = tl.max(m, 0)
        w = tl.exp2(m - m_max)                        # weight of each split (0 for an empty one)
        l_sum = tl.sum(l * w, 0)
        out = tl.sum(acc * w[:, None], 0) / l_sum
        tl.store(out_ptr + h * D + d, out.to(out_ptr.dtype.element_ty))
        return m_max, l_sum

    @triton.jit(do_not_specialize=["n_idx", "width", "S"])
    def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, idx_ptr, m_ptr, l_ptr, acc_ptr, s_ptr, count_ptr, full_ptr,
                      sk0, sk1, sv0, sv1, si0, n_idx, width, S, qk_scale,
                      G: tl.constexpr, D: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HAS_IDX: tl.constexpr,
                      SCORES: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      PDL: tl.constexpr, COUNT: tl.constexpr, FLAG: tl.constexpr, PREFETCH: tl.constexpr):
        if PDL:  # every program is running: the combine kernel may be scheduled (it waits)
            gdc_launch_dependents()
        kvh = tl.program_id(0)
        split = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)                     # query head within the group (padded)
        d = tl.arange(0, D)
        h = kvh * G + g                               # [BLOCK_G] query head
        hmask = g < G
        q = tl.load(q_ptr + h[:, None] * D + d[None, :], mask=hmask[:, None], other=0.0)
        if UPCAST:  # the interpreter's bf16 math is broken: compute in float32
            q = q.to(tl.float32)
        cur = tl.load(pos_ptr).to(tl.int32)           # the current token's position, read here
        if FLAG:     # the caller's flag decides on the GPU: every position (nonzero), or idx
            flag = tl.load(full_ptr).to(tl.int32)
            dense = flag != 0
            n_att = tl.where(dense, cur + 1, n_idx + 1)
        elif HAS_IDX:  # attended entries: idx's n slots, then the current token
            n_att = n_idx + 1
        else:        # every position 0..pos
            n_att = cur + 1
        chunk = tl.cdiv(tl.cdiv(n_att, BLOCK_N), S) * BLOCK_N  # entries per split, whole blocks
        start = split * chunk
        m_i = tl.full([BLOCK_G], -1e30, tl.float32)  # finite: an empty split gives no NaN
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        n_valid = 0                                   # entries this program attended
        if HAS_IDX:  # idx's entries are read from here (a dense pass reads none)
            n_read = tl.where(dense, 0, n_idx) if FLAG else n_idx
            if PREFETCH:  # the first block's entries, before the loop
                nxt = tl.load(idx_ptr + kvh * si0 + start + tl.arange(0, BLOCK_N),
                              mask=start + tl.arange(0, BLOCK_N) < n_read, other=0)
        for j0 in range(start, tl.minimum(start + chunk, n_att), BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)            # [BLOCK_N] attended entry
            inside = j < n_att
            if HAS_IDX:  # entries 0..n-1 come from idx, entry n is the current token
                if PREFETCH:  # this block's entries came with the last; the next block's are asked for now
                    at = nxt
                    nxt = tl.load(idx_ptr + kvh * si0 + j + BLOCK_N, mask=j + BLOCK_N < n_read, other=0)
                else:
                    at = tl.load(idx_ptr + kvh * si0 + j, mask=j < n_read, other=0)
                at = tl.where(j < n_read, at, cur)
                if FLAG:  # a dense pass takes entry j = position j
                    at = tl.where(dense, j, at)
                valid = inside & (at >= 0)            # idx < 0: an empty slot
            else:
                at = j
                valid = inside
            # An entry that is not attended (empty slot, past the end) loads the current token's
            # row instead: always in the cache, so the gathers need no mask; its logit is -inf.
            at = tl.where(valid, at, cur).to(tl.int64)
            n_valid += tl.sum(valid.to(tl.int32), 0)
            kk = tl.load(k_ptr + kvh * sk0 + at[:, None] * sk1 + d[None, :])  # [BLOCK_N, D]
            vv = tl.load(v_ptr + kvh * sv0 + at[:, None] * sv1 + d[None, :])
            if UPCAST:
                kk = kk.to(tl.float32)
                vv = vv.to(tl.float32)
            # scaled logits in base 2 (exp2 is cheaper): [BLOCK_G, BLOCK_N]
            s = tl.dot(q, tl.trans(kk), input_precision=PREC) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            if SCORES:  # written once (-inf at empty slots); the combine kernel normalises them
                keep = hmask[:, None] & inside[None, :]
                if FLAG:  # scores of a dense pass only
                    keep = keep & (j[None, :] < tl.where(dense, n_att, 0))
                tl.store(s_ptr + h[:, None] * width + j[None, :], s, mask=keep)
            # online softmax
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
            m_i = m_new
        # partials, laid out [H, S] and [H, S, D]
        if COUNT:  # the caller's counters: a call, a dense one, entries attended, positions 0..pos
            tl.atomic_add(count_ptr + 2, n_valid.to(tl.int64))
            if split == 0:
                tl.atomic_add(count_ptr + 3, (cur + 1).to(tl.int64))
                if kvh == 0:
                    tl.atomic_add(count_ptr, 1)
                    if FLAG:
                        tl.atomic_add(count_ptr + 1, dense.to(tl.int64))
                    elif not HAS_IDX:
                        tl.atomic_add(count_ptr + 1, 1)
        tl.store(m_ptr + h * S + split, m_i, mask=hmask)
        tl.store(l_ptr + h * S + split, l_i, mask=hmask)
        tl.store(acc_ptr + (h[:, None] * S + split) * D + d[None, :], acc, mask=hmask[:, None])

    @triton.jit(do_not_specialize=["width", "S"])
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, s_ptr, pos_ptr, full_ptr, width, S,
                        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
                        SCORES: tl.constexpr, HAS_IDX: tl.constexpr, PDL: tl.constexpr,
                        FLAG: tl.constexpr):
        """Grid (H, blocks of a probs row). Program (h, 0) writes out[h]; every program turns
        one block of head h's scaled logits into probabilities, in place."""
        if PDL:  # launched early: wait until the split kernel's writes are complete and visible
            gdc_wait()
        h = tl.program_id(0)
        b = tl.program_id(1)
        if FLAG:  # no dense pass: no probabilities to make
            if (b > 0) & (tl.load(full_ptr) == 0):
                return
        if b == 0:
            m_max, l_sum = _merge(m_ptr, l_ptr, acc_ptr, out_ptr, h, S, D, BLOCK_S)
        else:  # same numbers, without writing out
            sp = tl.arange(0, BLOCK_S)
            m = tl.load(m_ptr + h * S + sp, mask=sp < S, other=float("-inf"))
            l = tl.load(l_ptr + h * S + sp, mask=sp < S, other=0.0)
            m_max = tl.max(m, 0)
            l_sum = tl.sum(l * tl.exp2(m - m_max), 0)
        if SCORES:
            lse = m_max + tl.log2(l_sum)              # log-sum-exp, base 2
            if FLAG:     # a dense pass: logits at 0..pos (the programs of a sparse one write nothing)
                dense = tl.load(full_ptr) != 0
                n_att = tl.where(dense, tl.load(pos_ptr).to(tl.int32) + 1, 0)
                width = tl.where(dense, width, 0)
            elif HAS_IDX:  # the whole row was written
                n_att = width
            else:        # logits at 0..pos only; the row's rest gets exact zeros
                n_att = tl.load(pos_ptr).to(tl.int32) + 1
            j = b * BLOCK_P + tl.arange(0, BLOCK_P)
            x = tl.load(s_ptr + h * width + j, mask=j < n_att, other=float("-inf"))
            tl.store(s_ptr + h * width + j, tl.exp2(x - lse), mask=j < width)


# Launch settings on CUDA, tuned on an H100 for Llama-3.1-8B shapes (bench_attention.py
# --sweep); `splits` is the number of programs per KV head at long lengths; `pdl` launches the
# combine kernel early (programmatic dependent launch: 0.5-0.7 us less per call on the H100);
# `prefetch` reads idx's next block one iteration ahead, so the K/V gathers need not wait for it.
# One set for every launch, sparse, dense or flagged: so a flagged dense pass gives idx=None's
# bits, and the dense passes measured no slower with it (notes/bench_session18.md).
CUDA_CONFIG = dict(block_n=32, num_warps=4, num_stages=2, splits=64, pdl=True, prefetch=True)
# Interpreter: few programs, big blocks.
CPU_CONFIG = dict(block_n=128, num_warps=4, num_stages=1, splits=2, pdl=False, prefetch=True)


def attention_triton(q, k, v, pos, idx=None, scores=False, block_n=None, num_splits=None,
                     num_warps=None, num_stages=None, exact_splits=False, pdl=None, count=None,
                     full=None, prefetch=None):
    """Split-KV Triton decode. pos is read by the kernels only, and the grid and every launch
    argument depend on shapes alone, so one CUDA graph serves every position. Tuning
    arguments are for tests and the benchmark only; exact_splits=True keeps num_splits even
    if some splits can get no entry (tests). With `full` (a flag on the device, idx given) the
    launches are the dense ones (width N), so a dense pass gives the same bits as idx=None."""
    H, D = q.shape
    Hkv, N, _ = k.shape
    G = H // Hkv
    n_idx = 0 if idx is None else idx.shape[1]
    width = N if idx is None or full is not None else n_idx + 1  # a probs row; the most entries attended
    cfg = CUDA_CONFIG if q.is_cuda else CPU_CONFIG
    block_n = block_n or cfg["block_n"]
    S = num_splits or cfg["splits"]
    if not exact_splits:  # at most one split per block of width (dense: of N, not pos + 1)
        blocks = triton.cdiv(width, block_n)
        S = max(1, min(S, blocks))
        S = triton.cdiv(width, triton.cdiv(blocks, S) * block_n)  # sparse: no split empty
    # inner dims must be contiguous; views of a larger buffer keep their outer strides
    q = q.contiguous()
    k = k if k.stride(2) == 1 else k.contiguous()
    v = v if v.stride(2) == 1 else v.contiguous()
    if idx is not None and (idx.stride(1) != 1 or idx.dtype not in (torch.int32, torch.int64)):
        idx = idx.contiguous().long()
    dev = q.device
    work = torch.empty(H * S * (D + 2), dtype=torch.float32, device=dev)  # one allocation
    m, l, acc = work[:H * S], work[H * S:2 * H * S], work[2 * H * S:]     # [H,S] [H,S] [H,S,D]
    out = torch.empty(H, D, dtype=q.dtype, device=dev)
    probs = torch.empty(H, width, dtype=torch.float32, device=dev) if scores else m
    idx_arg = idx if idx is not None else m           # unused when HAS_IDX is False
    si0 = idx.stride(0) if idx is not None else 0
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    warps = num_warps or cfg["num_warps"]
    pdl = cfg["pdl"] if pdl is None else pdl
    pdl = bool(pdl and q.is_cuda and gdc_wait is not None)
    launch = dict(launch_pdl=True) if pdl else {}  # only the second kernel is launched early
    _split_kernel[(Hkv, S)](
        q, k, v, pos, idx_arg, m, l, acc, probs, m if count is None else count, pos if full is None else full,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), si0, n_idx, width, S,
        math.log2(math.e) / math.sqrt(D),
        G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,
        HAS_IDX=idx is not None, SCORES=scores, UPCAST=INTERPRET, PREC=prec, PDL=pdl,
        COUNT=count is not None, FLAG=full is not None, num_warps=warps,
        PREFETCH=cfg["prefetch"] if prefetch is None else prefetch,
        num_stages=num_stages or cfg["num_stages"])
    block_p = 1024 if dev.type == "cuda" else 4096
    nb = triton.cdiv(width, block_p) if scores else 1
    _combine_kernel[(H, nb)](m, l, acc, out, probs, pos, pos if full is None else full, width, S, D=D,
                             BLOCK_S=max(2, triton.next_power_of_2(S)), BLOCK_P=block_p,
                             SCORES=scores, HAS_IDX=idx is not None, PDL=pdl,
                             FLAG=full is not None, num_warps=warps, **launch)
    return out, (probs if scores else None)


# ----------------------------------------------------------------------------- prompt column sums

def column_scores_torch(q, k, block=256):
    """Reference for column_scores: blocks of `block` queries against every key ([H, block, L]
    float32 at a time), causal softmax, the group's max, summed over the block's queries."""
    H, L, D = q.shape
    Hkv = k.shape[0]
    acc = torch.zeros(Hkv, L, dtype=torch.float32, device=q.device)
    kf = k.float()
    for s in range(0, L, block):
        e = min(s + block, L)
        qb = q[:, s:e].float().view(Hkv, H // Hkv, e - s, D)
        att = qb @ kf[:, None, :e].transpose(2, 3) / math.sqrt(D)        # [Hkv, G, b, e]
        future = torch.arange(e, device=q.device) > torch.arange(s, e, device=q.device)[:, None]
        p = att.masked_fill(future, float("-inf")).softmax(-1)
        acc[:, :e] += p.amax(1).sum(1)                                    # group max, query sum
    return acc


if triton is not None:

    @triton.jit
    def _lse_tile(q, k_ptr, m, l, j, i, sk1, L, qk_scale, D: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr, MASK: tl.constexpr):
        """One key tile of pass 1: the online log-sum-exp (m, l) of queries i over keys j."""
        d = tl.arange(0, D)
        kk = tl.load(k_ptr + j[:, None] * sk1 + d[None, :], mask=(j < L)[:, None], other=0.0)
        if UPCAST:
            kk = kk.to(tl.float32)
        s = tl.dot(q, tl.trans(kk), input_precision=PREC) * qk_scale       # [BLOCK_Q, BLOCK_K]
        if MASK:  # the diagonal: causal
            s = tl.where(j[None, :] <= i[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        return m_new, l

    @triton.jit(do_not_specialize=["L"])
    def _row_lse_kernel(q_ptr, k_ptr, lse_ptr, sq0, sq1, sk0, sk1, L, qk_scale,
                        G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr,
                        BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """Pass 1, grid (H, query blocks): each query's log-sum-exp (base 2) over keys 0..i."""
        h = tl.program_id(0)
        qb = tl.num_programs(1) - 1 - tl.program_id(1)   # the longest rows first
        i = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + h * sq0 + i[:, None] * sq1 + d[None, :], mask=(i < L)[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_ptr += (h // G) * sk0
        m = tl.full([BLOCK_Q], -1e30, tl.float32)
        l = tl.zeros([BLOCK_Q], tl.float32)
        diag = qb * BLOCK_Q // BLOCK_K * BLOCK_K            # keys before it: seen by every row, no mask
        for j0 in range(0, diag, BLOCK_K):
            m, l = _lse_tile(q, k_ptr, m, l, j0 + tl.arange(0, BLOCK_K), i, sk1, L, qk_scale, D, UPCAST, PREC, False)
        for j0 in range(diag, tl.minimum((qb + 1) * BLOCK_Q, L), BLOCK_K):
            m, l = _lse_tile(q, k_ptr, m, l, j0 + tl.arange(0, BLOCK_K), i, sk1, L, qk_scale, D, UPCAST, PREC, True)
        tl.store(lse_ptr + h * L + i, m + tl.log2(l), mask=i < L)

    @triton.jit
    def _column_tile(q_ptr, lse_ptr, kk, i, j, kvh, sq0, sq1, L, qk_scale, G: tl.constexpr, D: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                     MASK: tl.constexpr):
        """One query tile of pass 2: per key j, the sum over queries i of the group's largest
        probability. The max is taken over log-probabilities, so one exp2 serves the group."""
        d = tl.arange(0, D)
        x = tl.full([BLOCK_Q, BLOCK_K], float("-inf"), tl.float32)
        for g in range(G):                               # the group's query heads, one at a time
            h = kvh * G + g
            q = tl.load(q_ptr + h * sq0 + i[:, None] * sq1 + d[None, :], mask=(i < L)[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(lse_ptr + h * L + i, mask=i < L, other=0.0)
            x = tl.maximum(x, tl.dot(q, tl.trans(kk), input_precision=PREC) * qk_scale - lse[:, None])
        p = tl.exp2(x)
        if MASK:  # the diagonal and the last tile: causal, real queries
            p = tl.where((j[None, :] <= i[:, None]) & (i < L)[:, None], p, 0.0)
        return tl.sum(p, 0)

    @triton.jit(do_not_specialize=["L"])
    def _column_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, sq0, sq1, sk0, sk1, L, qk_scale,
                       G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """Pass 2, grid (Hkv, key blocks): for keys j of the block, the sum over queries i >= j
        of the group's max probability exp2(s - lse). Only [BLOCK_Q, BLOCK_K] tiles exist."""
        kvh = tl.program_id(0)
        kb = tl.program_id(1)                            # the first blocks have the most queries
        j = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        d = tl.arange(0, D)
        kk = tl.load(k_ptr + kvh * sk0 + j[:, None] * sk1 + d[None, :], mask=(j < L)[:, None], other=0.0)
        if UPCAST:
            kk = kk.to(tl.float32)
        acc = tl.zeros([BLOCK_K], tl.float32)
        # query tiles: the diagonal (masked), those past it (every query sees every key), the last (masked)
        lo = kb * BLOCK_K // BLOCK_Q * BLOCK_Q
        hi = tl.minimum(tl.cdiv((kb + 1) * BLOCK_K, BLOCK_Q) * BLOCK_Q, L)
        full = L // BLOCK_Q * BLOCK_Q
        for i0 in range(lo, hi, BLOCK_Q):
            acc += _column_tile(q_ptr, lse_ptr, kk, i0 + tl.arange(0, BLOCK_Q), j, kvh, sq0, sq1, L, qk_scale,
                                G, D, BLOCK_Q, BLOCK_K, UPCAST, PREC, True)
        for i0 in range(hi, full, BLOCK_Q):
            acc += _column_tile(q_ptr, lse_ptr, kk, i0 + tl.arange(0, BLOCK_Q), j, kvh, sq0, sq1, L, qk_scale,
                                G, D, BLOCK_Q, BLOCK_K, UPCAST, PREC, False)
        for i0 in range(tl.maximum(hi, full), L, BLOCK_Q):
            acc += _column_tile(q_ptr, lse_ptr, kk, i0 + tl.arange(0, BLOCK_Q), j, kvh, sq0, sq1, L, qk_scale,
                                G, D, BLOCK_Q, BLOCK_K, UPCAST, PREC, True)
        tl.store(out_ptr + kvh * L + j, acc, mask=j < L)


def column_scores_triton(q, k, rows=None, columns=None):
    """Two passes over [BLOCK_Q, BLOCK_K] tiles: row log-sum-exps, then column sums. rows, columns:
    each pass's (block_q, block_k, num_warps), default COLUMN_CONFIG's."""
    H, L, D = q.shape
    Hkv = k.shape[0]
    q = q if q.stride(2) == 1 else q.contiguous()
    k = k if k.stride(2) == 1 else k.contiguous()
    cfg = COLUMN_CONFIG if q.is_cuda else dict(rows=(32, 32, 4), columns=(32, 32, 4))
    rows, columns = rows or cfg["rows"], columns or cfg["columns"]
    lse = torch.empty(H, L, dtype=torch.float32, device=q.device)
    out = torch.empty(Hkv, L, dtype=torch.float32, device=q.device)
    scale = math.log2(math.e) / math.sqrt(D)
    common = dict(G=H // Hkv, D=D, UPCAST=INTERPRET, PREC="ieee" if q.dtype == torch.float32 else "tf32")
    bq, bk, w = rows
    _row_lse_kernel[(H, triton.cdiv(L, bq))](q, k, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), L,
                                             scale, BLOCK_Q=bq, BLOCK_K=bk, num_warps=w, **common)
    bq, bk, w = columns
    _column_kernel[(Hkv, triton.cdiv(L, bk))](q, k, lse, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                              L, scale, BLOCK_Q=bq, BLOCK_K=bk, num_warps=w, **common)
    return out


# CUDA tiles (block_q, block_k, num_warps) of the two passes; bench_attention.py --prefill --sweep
COLUMN_CONFIG = dict(rows=(128, 64, 8), columns=(128, 128, 8))


def column_scores(q, k, kernel="auto", block=256):
    """H2O's accumulated prompt scores. q [H, L, D] the prompt's queries, k [Hkv, L, D] its keys
    (GQA: query head h uses KV head h // (H // Hkv)) -> [Hkv, L] float32: for position j, the sum
    over queries i >= j of the largest causal-softmax probability any of the group's heads gives j.
    Never builds an L x L matrix. kernel: "torch" (`block` queries at a time), "triton" (two passes
    over tiles), or "auto" (Triton on CUDA)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[1:] != k.shape[1:] or q.shape[0] % k.shape[0] \
            or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"want q [H, L, D] and k [Hkv, L, D] alike; got {tuple(q.shape)}, {tuple(k.shape)}")
    if not use_triton(kernel, q.device):
        return column_scores_torch(q, k, block)
    if q.shape[2] < 16 or q.shape[2] & (q.shape[2] - 1):
        raise ValueError(f"kernel='triton' needs a power-of-2 head dim >= 16, got {q.shape[2]}")
    return column_scores_triton(q, k)


# ----------------------------------------------------------------------------- refresh selection

def pooled_top_torch(probs, n_kv, pool, k, last=None):
    """Reference for pooled_top: the group's max over query heads, a max-pool of width `pool` over
    positions (same padding), then per KV head the k best positions <= last (unsorted; -1 and -inf
    in slots no position fills)."""
    s = probs.view(n_kv, -1, probs.shape[-1]).amax(1)
    s = torch.nn.functional.max_pool1d(s[None], pool, stride=1, padding=pool // 2)[0]
    if last is not None:
        s = s.masked_fill(torch.arange(s.shape[1], device=s.device) > last, float("-inf"))
    if k > s.shape[1]:
        s = torch.nn.functional.pad(s, (0, k - s.shape[1]), value=float("-inf"))
    best = s.topk(k, dim=-1, sorted=False)
    return best.indices.masked_fill(best.values == float("-inf"), -1), best.values


# Radix select on the scores' float32 bits (non-negative floats order like their bits): four 8-bit
# digits, most significant first; each pass counts the digits of the entries that match the prefix
# chosen so far, and the next pass picks the digit where the k-th largest lies. 256 bins a pass:
# tl.histogram's instructions grow with its bins (H100, 8 x 131K scores: a 1024-bin pass 38 us,
# a 256-bin pass 9.5 us).

if triton is not None:

    @triton.jit
    def _skip(flag_ptr, HAS_FLAG: tl.constexpr):
        """True where a flag is given and holds 0: the selection is not wanted at this call."""
        if HAS_FLAG:
            return tl.load(flag_ptr) == 0
        return False

    @triton.jit
    def _digit(hist_ptr, row, rem):
        """From one pass's histogram row: the digit where the rem-th largest entry lies, and how
        many are still to take among the entries with that digit (every larger digit is taken)."""
        b = tl.arange(0, 256)
        h = tl.load(hist_ptr + row * 256 + b)
        ge = tl.sum(h, 0) - tl.cumsum(h, 0) + h                      # entries with digit >= b
        d = tl.max(tl.where(ge >= rem, b, 0), 0)
        return d, rem - tl.sum(tl.where(b > d, h, 0), 0)

    @triton.jit
    def _threshold(hist_ptr, kvh, Hkv, k, PASSES: tl.constexpr):
        """From the histograms of the first PASSES passes: (the k-th largest value's leading bits,
        how many of the entries sharing them are still to take)."""
        d, rem = _digit(hist_ptr, kvh, k)
        prefix = d << 24
        for p in tl.static_range(1, PASSES):
            d, rem = _digit(hist_ptr, p * Hkv + kvh, rem)
            prefix = prefix | (d << (24 - 8 * p))
        return prefix, rem

    @triton.jit
    def _bits(s):
        """Order-preserving int32 bits of non-negative floats, and which entries may be taken."""
        s = s + 0.0                                   # -0.0 -> +0.0
        return s.to(tl.int32, bitcast=True), s >= 0   # -inf (not selectable) and NaN: False

    @triton.jit(do_not_specialize=["chunk"])
    def _pool_hist_kernel(p_ptr, gm_ptr, s_ptr, hist_ptr, last_ptr, flag_ptr, N, chunk, Hkv,
                          G: tl.constexpr, POOL: tl.constexpr, HALO: tl.constexpr, BLOCK: tl.constexpr,
                          HAS_LAST: tl.constexpr, HAS_FLAG: tl.constexpr):
        """Grid (Hkv, programs per row). s = the pooled group max (-inf past last); histogram of
        its first digit. The group max goes through a row of gm_ptr that is the program's own
        (its chunk and HALO positions either side), so the pool reads it at 7 shifts, not 28 probs."""
        if _skip(flag_ptr, HAS_FLAG):
            return
        kvh = tl.program_id(0)
        pid = tl.program_id(1)
        start = pid * chunk
        gm_ptr += (kvh * tl.num_programs(1) + pid) * (chunk + 2 * HALO) + HALO - start  # gm_ptr + j: position j
        for j0 in range(start, start + chunk, BLOCK):  # the group max, -inf outside 0..N-1
            j = j0 + tl.arange(0, BLOCK)
            x = tl.load(p_ptr + kvh * G * N + j, mask=j < N, other=float("-inf"))
            for g in tl.static_range(1, G):
                x = tl.maximum(x, tl.load(p_ptr + (kvh * G + g) * N + j, mask=j < N, other=float("-inf")))
            tl.store(gm_ptr + j, x)
        e = tl.arange(0, 2 * HALO)                    # the halos: HALO positions before, HALO after
        jh = tl.where(e < HALO, start - HALO + e, start + chunk - HALO + e)
        xh = tl.full([2 * HALO], float("-inf"), tl.float32)
        for g in tl.static_range(G):
            xh = tl.maximum(xh, tl.load(p_ptr + (kvh * G + g) * N + jh, mask=(jh >= 0) & (jh < N), other=float("-inf")))
        tl.store(gm_ptr + jh, xh)
        tl.debug_barrier()                            # the program's stores land before its reads
        hist = tl.zeros([256], tl.int32)
        bad = 0
        for j0 in range(start, tl.minimum(start + chunk, N), BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            best = tl.load(gm_ptr + j - POOL // 2)
            for o in tl.static_range(1, POOL):
                best = tl.maximum(best, tl.load(gm_ptr + j + (o - POOL // 2)))
            if HAS_LAST:
                best = tl.where(j <= tl.load(last_ptr), best, float("-inf"))
            tl.store(s_ptr + kvh * N + j, best, mask=j < N)
            u, ok = _bits(best)
            ok = ok & (j < N)
            hist += tl.histogram(tl.where(ok, (u >> 24) & 255, 0), 256)
            bad += tl.sum((~ok).to(tl.int32), 0)      # counted in bin 0: taken out below
        b = tl.arange(0, 256)
        tl.atomic_add(hist_ptr + kvh * 256 + b, hist - tl.where(b == 0, bad, 0))

    @triton.jit(do_not_specialize=["N", "chunk", "k"])
    def _hist_kernel(s_ptr, hist_ptr, cnt_ptr, flag_ptr, N, chunk, Hkv, k, PASS: tl.constexpr,
                     BLOCK: tl.constexpr, HAS_FLAG: tl.constexpr):
        """Pass 1, 2 or 3: histogram of the next 8 bits among the entries matching the prefix.
        The last pass also keeps, per program, its entries above the prefix and its histogram's
        suffix sums (entries with digit >= b), from which the compaction counts its share."""
        if _skip(flag_ptr, HAS_FLAG):
            return
        kvh = tl.program_id(0)
        pid = tl.program_id(1)
        start = pid * chunk
        shift: tl.constexpr = 24 - 8 * PASS
        prefix, rem = _threshold(hist_ptr, kvh, Hkv, k, PASS)
        hist = tl.zeros([256], tl.int32)
        bad = 0
        above = 0
        for j0 in range(start, tl.minimum(start + chunk, N), BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            u, ok = _bits(tl.load(s_ptr + kvh * N + j, mask=j < N, other=float("-inf")))
            if PASS == 3:
                above += tl.sum((ok & ((u >> 8) > (prefix >> 8))).to(tl.int32), 0)
            ok = ok & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(tl.where(ok, (u >> shift) & 255, 0), 256)
            bad += tl.sum((~ok).to(tl.int32), 0)
        b = tl.arange(0, 256)
        hist -= tl.where(b == 0, bad, 0)
        tl.atomic_add(hist_ptr + (PASS * Hkv + kvh) * 256 + b, hist)
        if PASS == 3:  # row of 257: entries above the prefix, then the suffix sums
            row = cnt_ptr + (kvh * tl.num_programs(1) + pid) * 257
            tl.store(row, above)
            tl.store(row + 1 + b, tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist)

    @triton.jit(do_not_specialize=["N", "chunk", "k"])
    def _compact_kernel(s_ptr, hist_ptr, cnt_ptr, idx_ptr, val_ptr, flag_ptr, N, chunk, Hkv, k, P,
                        sx0, sv0, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, HAS_FLAG: tl.constexpr):
        """Writes the selection in position order: every entry above the threshold and the first
        entries on it, as many as still wanted; the last program empties the slots left over."""
        if _skip(flag_ptr, HAS_FLAG):
            return
        kvh = tl.program_id(0)
        pid = tl.program_id(1)
        t, rem = _threshold(hist_ptr, kvh, Hkv, k, 4)
        q = tl.arange(0, BLOCK_P)
        row = cnt_ptr + (kvh * P + q) * 257
        d = t & 255
        rest = tl.load(row + 2 + d, mask=q < tl.where(d < 255, P, 0), other=0)  # digits above d in t's bucket
        gt = tl.load(row, mask=q < P, other=0) + rest                   # each program's entries above t
        eq = tl.load(row + 1 + d, mask=q < P, other=0) - rest            # and on it
        eq_before = tl.cumsum(eq, 0) - eq                            # on the threshold, earlier programs
        taken = gt + tl.minimum(tl.maximum(rem - eq_before, 0), eq)  # each program's selection
        slot = tl.sum(tl.where(q < pid, taken, 0), 0)
        eq_rank = tl.sum(tl.where(q < pid, eq, 0), 0)
        for j0 in range(pid * chunk, tl.minimum(pid * chunk + chunk, N), BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            x = tl.load(s_ptr + kvh * N + j, mask=j < N, other=float("-inf"))
            u, ok = _bits(x)
            on = ok & (u == t)
            on_rank = eq_rank + tl.cumsum(on.to(tl.int32), 0) - 1
            sel = (ok & (u > t)) | (on & (on_rank < rem))
            at = slot + tl.cumsum(sel.to(tl.int32), 0) - 1
            tl.store(idx_ptr + kvh * sx0 + at, j.to(tl.int64), mask=sel)
            tl.store(val_ptr + kvh * sv0 + at, x, mask=sel)
            slot += tl.sum(sel.to(tl.int32), 0)
            eq_rank += tl.sum(on.to(tl.int32), 0)
        if pid == tl.num_programs(1) - 1:                            # slots no position filled
            for e0 in range(tl.sum(taken, 0), k, BLOCK):
                e = e0 + tl.arange(0, BLOCK)
                tl.store(idx_ptr + kvh * sx0 + e, tl.full([BLOCK], -1, tl.int64), mask=e < k)
                tl.store(val_ptr + kvh * sv0 + e, tl.full([BLOCK], float("-inf"), tl.float32), mask=e < k)


SELECT_CONFIG = dict(programs=128, block=512)  # CUDA: programs per KV head, entries per block (H100: notes/select_session18.md)


def pooled_top_triton(probs, n_kv, pool, k, last=None, out=None, flag=None):
    """Triton pooled_top: one pass makes the pooled scores and the first digit's histogram, three
    more refine the threshold (the last also counts each program's share), then a compaction:
    five launches and a memset, no sort."""
    H, N = probs.shape
    probs = probs.contiguous().float()
    dev = probs.device
    cfg = SELECT_CONFIG if probs.is_cuda else dict(programs=2, block=256)
    P = max(1, min(cfg["programs"], triton.cdiv(N, 256)))
    BLOCK = cfg["block"]
    chunk = triton.cdiv(triton.cdiv(N, P), BLOCK) * BLOCK            # whole blocks per program
    P = triton.cdiv(N, chunk)
    halo = triton.next_power_of_2(max(1, pool // 2))
    idx, val = out if out is not None else (torch.empty(n_kv, k, dtype=torch.long, device=dev),
                                             torch.empty(n_kv, k, dtype=torch.float32, device=dev))
    s = torch.empty(n_kv, N, dtype=torch.float32, device=dev)
    gm = torch.empty(n_kv * P * (chunk + 2 * halo), dtype=torch.float32, device=dev)  # each program's group max
    hist = torch.zeros(4, n_kv, 256, dtype=torch.int32, device=dev)
    cnt = torch.empty(n_kv, P, 257, dtype=torch.int32, device=dev)
    fl = dict(HAS_FLAG=flag is not None)
    flag = s if flag is None else flag
    grid = (n_kv, P)
    _pool_hist_kernel[grid](probs, gm, s, hist, s if last is None else last, flag, N, chunk, n_kv,
                            G=H // n_kv, POOL=pool, HALO=halo, BLOCK=BLOCK, HAS_LAST=last is not None, **fl)
    for p in (1, 2, 3):
        _hist_kernel[grid](s, hist, cnt, flag, N, chunk, n_kv, k, PASS=p, BLOCK=BLOCK, **fl)
    _compact_kernel[grid](s, hist, cnt, idx, val, flag, N, chunk, n_kv, k, P, idx.stride(0), val.stride(0),
                          BLOCK=BLOCK, BLOCK_P=max(2, triton.next_power_of_2(P)), **fl)
    return idx, val


def pooled_top(probs, n_kv, pool, k, last=None, out=None, flag=None, kernel="auto"):
    """The refresh's selection. probs [H, N] float32 (rows of query heads, GQA groups of H // n_kv)
    -> (positions [n_kv, k] int64, scores [n_kv, k] float32): per KV head the k positions with the
    highest pooled score (max over the group's heads, then a max-pool of odd width `pool` over
    positions), among positions <= last (a one-element tensor on the device) if given; empty slots
    -1 and -inf. Slots in no particular order; between equal scores, any. out: (positions, scores)
    to write in place. flag: None or a one-element integer tensor on the device; where it holds 0
    nothing is computed or written (Triton) - a refresh that a CUDA graph skips on the GPU's
    decision. kernel: "torch" (reference; flag as a masked update), "triton", or "auto"."""
    if probs.dim() != 2 or probs.shape[0] % n_kv or pool < 1 or pool % 2 == 0 or k < 1:
        raise ValueError(f"want probs [H, N] with H a multiple of {n_kv}, an odd pool and k >= 1")
    if use_triton(kernel, probs.device):
        return pooled_top_triton(probs, n_kv, pool, k, last, out, flag)
    idx, val = pooled_top_torch(probs.float(), n_kv, pool, k, last)
    if out is None:
        return idx, val
    if flag is not None:
        idx, val = torch.where(flag != 0, idx, out[0]), torch.where(flag != 0, val, out[1])
    out[0].copy_(idx)
    out[1].copy_(val)
    return out


# ----------------------------------------------------------------------------- a partial step's join

def join_torch(idx, rank, pos, flag=None):
    """Reference for join: argmin of each row's ranks (the first of equal ones), then the current
    token and its rank 1 + pos written into that slot; with flag, only where it holds 0."""
    slot = rank.argmin(1, keepdim=True)
    new = pos.view(1, 1).expand(idx.shape[0], 1)
    if flag is None:
        idx.scatter_(1, slot, new)
        rank.scatter_(1, slot, 1.0 + new.float())
        return
    keep = flag.view(1, 1) != 0
    idx.scatter_(1, slot, torch.where(keep, idx.gather(1, slot), new))
    rank.scatter_(1, slot, torch.where(keep, rank.gather(1, slot), 1.0 + new.float()))


if triton is not None:

    @triton.jit(do_not_specialize=["K"])
    def _join_kernel(idx_ptr, rank_ptr, pos_ptr, flag_ptr, K, si0, sr0, BLOCK: tl.constexpr,
                     HAS_FLAG: tl.constexpr):
        """Program per row: the first slot of the lowest rank takes the current token."""
        if HAS_FLAG:
            if tl.load(flag_ptr) != 0:
                return
        row = tl.program_id(0)
        best = tl.full([BLOCK], float("inf"), tl.float32)
        at = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, K, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            r = tl.load(rank_ptr + row * sr0 + j, mask=j < K, other=float("inf"))
            lower = r < best                          # strictly: each lane keeps its first
            best = tl.where(lower, r, best)
            at = tl.where(lower, j, at)
        slot = tl.min(tl.where(best == tl.min(best, 0), at, K), 0)
        cur = tl.load(pos_ptr)
        tl.store(idx_ptr + row * si0 + slot, cur.to(idx_ptr.dtype.element_ty))
        tl.store(rank_ptr + row * sr0 + slot, 1.0 + cur.to(tl.float32))


def join(idx, rank, pos, flag=None, kernel="auto"):
    """RefreshKV's partial step, in place: in each row of idx [Hkv, K] (positions) and rank [Hkv, K]
    float32 (their ranks), the slot of the lowest rank (the first of equal ones) takes the current
    token pos (a one-element tensor on the device) with rank 1 + pos. flag: None, or a one-element
    integer tensor on the device: where it holds nonzero nothing changes. kernel: "torch"
    (reference), "triton" (one launch), or "auto"."""
    if not use_triton(kernel, idx.device):
        return join_torch(idx, rank, pos, flag)
    K = idx.shape[1]
    block = min(4096, triton.next_power_of_2(K))
    _join_kernel[(idx.shape[0],)](idx, rank, pos, rank if flag is None else flag, K, idx.stride(0), rank.stride(0),
                                  BLOCK=block, HAS_FLAG=flag is not None, num_warps=8 if block >= 2048 else 4)


# ----------------------------------------------------------------------------- h2o's step and the similarity check

def h2o_update_torch(probs, kept, acc, pos, recent):
    """Reference for h2o_update: the group's max probability added to each kept position's
    accumulated score; the current token takes the slot of the lowest score among the positions
    not within `recent` of it (an empty slot, score -inf, first; the first of equal ones)."""
    got = probs.view(kept.shape[0], -1, probs.shape[-1]).amax(1)  # [Hkv, K + 1], the current token last
    acc += got[:, :-1]
    near = (kept > pos - recent) & (kept >= 0)
    slot = acc.masked_fill(near, float("inf")).argmin(1, keepdim=True)
    kept.scatter_(1, slot, pos.view(1, 1).expand(kept.shape[0], 1))
    acc.scatter_(1, slot, got[:, -1:])


def similarity_check_torch(q_raw, q_mean, threshold):
    """Reference for similarity_check: the flag (int64 [1]) is 1 where the cosine between the mean
    query over heads and q_mean falls below threshold; there q_mean takes the mean query."""
    m = q_raw.float().mean(0)
    flag = (F.cosine_similarity(m, q_mean, dim=0) < threshold).view(1).long()
    q_mean.copy_(torch.where(flag != 0, m, q_mean))
    return flag


if triton is not None:

    @triton.jit(do_not_specialize=["K", "recent", "P"])
    def _h2o_kernel(p_ptr, kept_ptr, acc_ptr, pos_ptr, low_ptr, at_ptr, K, recent, sp0, sk0, sa0, P,
                    G: tl.constexpr, BLOCK: tl.constexpr, LAST: tl.constexpr, PDL: tl.constexpr):
        """Grid (Hkv, P): chunk c of row r (BLOCK slots) gets its scores added and writes its lowest
        non-recent slot to low/at [Hkv, P] (value, first index). LAST, grid (Hkv, 1): the lowest of
        the row's P chunks (the first of equal ones) takes the current token and its group max."""
        if PDL:  # launched early: let the next kernel be scheduled, then wait for the previous one
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0)
        cur = tl.load(pos_ptr).to(tl.int64)
        if LAST:
            c = tl.arange(0, BLOCK)
            low = tl.load(low_ptr + row * P + c, mask=c < P, other=float("inf"))  # [BLOCK >= P]
            at = tl.load(at_ptr + row * P + c, mask=c < P, other=K)
            slot = tl.min(tl.where(low == tl.min(low, 0), at, K), 0)  # chunks in order: the first slot
            top = tl.load(p_ptr + row * G * sp0 + K)
            for g in tl.static_range(1, G):
                top = tl.maximum(top, tl.load(p_ptr + (row * G + g) * sp0 + K))
            tl.store(kept_ptr + row * sk0 + slot, cur.to(kept_ptr.dtype.element_ty))
            tl.store(acc_ptr + row * sa0 + slot, top)
        else:
            j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            inside = j < K
            got = tl.load(p_ptr + row * G * sp0 + j, mask=inside, other=0.0)
            for g in tl.static_range(1, G):           # the group's max
                got = tl.maximum(got, tl.load(p_ptr + (row * G + g) * sp0 + j, mask=inside, other=0.0))
            a = tl.load(acc_ptr + row * sa0 + j, mask=inside, other=0.0) + got
            tl.store(acc_ptr + row * sa0 + j, a, mask=inside)
            kk = tl.load(kept_ptr + row * sk0 + j, mask=inside, other=-1).to(tl.int64)
            x = tl.where(((kk > cur - recent) & (kk >= 0)) | ~inside, float("inf"), a)  # recent: not eligible
            low = tl.min(x, 0)
            tl.store(low_ptr + row * P + tl.program_id(1), low)
            tl.store(at_ptr + row * P + tl.program_id(1), tl.min(tl.where(x == low, j, K), 0))  # the first

    @triton.jit
    def _similarity_kernel(q_ptr, mean_ptr, flag_ptr, threshold, eps, H: tl.constexpr, D: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program: mean over heads, cosine as torch computes it (each side over its clamped
        norm), the flag, and q_mean replaced where it is set."""
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + h[:, None] * D + d[None, :], mask=(h < H)[:, None] & (d < D)[None, :], other=0.0)
        m = tl.sum(q.to(tl.float32), 0) / H
        y = tl.load(mean_ptr + d, mask=d < D, other=0.0)
        nm = tl.maximum(tl.sqrt(tl.sum(m * m, 0)), eps)
        ny = tl.maximum(tl.sqrt(tl.sum(y * y, 0)), eps)
        flag = tl.sum((m / nm) * (y / ny), 0) < threshold
        tl.store(flag_ptr, flag.to(tl.int64))
        tl.store(mean_ptr + d, tl.where(flag, m, y), mask=d < D)


H2O_PROGRAMS = 64  # about this many programs per KV head's row, of 256 to 4096 slots each (H100 sweep)


def h2o_update(probs, kept, acc, pos, recent, kernel="auto"):
    """H2O's step, in place, after the attention over kept [Hkv, K] (positions) and the current token:
    probs [H, K + 1] (GQA groups of H // Hkv rows, the current token last) adds each group's max to
    acc [Hkv, K] float32; then, per row, the slot of the lowest acc among positions not above
    pos - recent (empty slots, -1 with acc -inf, first; the first of equal ones) takes the current
    token and its group max. kernel: "torch" (reference), "triton" (two launches: the row in
    chunks of many programs, then each row's lowest chunk), or "auto"."""
    if not use_triton(kernel, kept.device):
        return h2o_update_torch(probs, kept, acc, pos, recent)
    Hkv, K = kept.shape
    block = max(256, min(4096, triton.next_power_of_2(triton.cdiv(K, H2O_PROGRAMS))))  # slots per program
    P = triton.cdiv(K, block)
    low = torch.empty(Hkv, P, dtype=torch.float32, device=kept.device)  # each chunk's lowest score
    at = torch.empty(Hkv, P, dtype=torch.int32, device=kept.device)     # and its first slot
    pdl = kept.is_cuda and gdc_wait is not None
    args = (probs, kept, acc, pos, low, at, K, recent, probs.stride(0), kept.stride(0), acc.stride(0), P)
    launch = dict(G=probs.shape[0] // Hkv, PDL=pdl, num_warps=4, **(dict(launch_pdl=True) if pdl else {}))
    _h2o_kernel[(Hkv, P)](*args, BLOCK=block, LAST=False, **launch)
    _h2o_kernel[(Hkv, 1)](*args, BLOCK=max(2, triton.next_power_of_2(P)), LAST=True, **launch)


def similarity_check(q_raw, q_mean, threshold, kernel="auto"):
    """RefreshKV's check: q_raw [H, D] this step's queries (before rotary), q_mean [D] float32 the
    mean query of the last full step. Returns a flag, int64 [1] on the device: 1 where the cosine
    between the mean of q_raw over heads and q_mean is below threshold; there q_mean takes that
    mean, in place. kernel: "torch" (reference), "triton" (one launch), or "auto"."""
    if not use_triton(kernel, q_raw.device):
        return similarity_check_torch(q_raw, q_mean, threshold)
    H, D = q_raw.shape
    flag = torch.empty(1, dtype=torch.int64, device=q_raw.device)
    _similarity_kernel[(1,)](q_raw.contiguous(), q_mean, flag, threshold, 1e-8, H=H, D=D,
                             BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return flag

# ----------------------------------------------------------------------------- decode step: fused small ops
# One decoded token (batch 1): each weight product is a matrix-vector product that streams the
# weight once; the small ops around it (RMSNorm, silu * up, the residual add) ride inside it, and
# rotary embedding with the cache write is one launch (model.py uses them on CUDA for decode
# steps). Each rounds where PyTorch's ops round, so results differ from the PyTorch path's by the
# summation order and the last bits of 1/sqrt and exp (bf16 on an H100: 99.7% or more of the
# outputs the same bits).

def linear_torch(x, w, norm=None, eps=1e-5, silu=False, residual=None):
    """The PyTorch ops linear replaces: [residual +] w @ f(x), f as in linear."""
    x = x.reshape(-1)
    if silu:
        gate, up = x.chunk(2)
        x = F.silu(gate) * up
    if norm is not None:
        x = norm * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    y = F.linear(x, w)
    return y if residual is None else residual.reshape(-1) + y


if triton is not None:

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, y_ptr, g_ptr, r_ptr, eps, N, K,
                       NORM: tl.constexpr, SILU: tl.constexpr, RES: tl.constexpr, PDL: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_N rows of y = W f(x) (+ r), W [N, K] row-major: f is x, or g * rms_norm(x) (NORM),
        or silu(gate) * up of x = [gate, up] (SILU); float32 sums, rounded where PyTorch rounds."""
        dt = y_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        wp = w_ptr + tl.program_id(0).to(tl.int64) * BLOCK_N * K + tl.arange(0, BLOCK_N)[:, None] * K + cols[None, :]
        w = tl.load(wp, mask=(rows < N)[:, None] & (cols < K)[None, :], other=0.0)  # no kernel writes W: read early
        if PDL:  # launched early: let the next kernel be scheduled, then wait for the previous one
            gdc_launch_dependents()
            gdc_wait()
        if NORM:  # the inverse RMS of x, recomputed by every program (x is small and stays in L2)
            ss = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                ss += xk * xk
            r = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # per-column partial sums, reduced once at the end
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            # the next tile of W, read one iteration ahead (the loads are not pipelined otherwise)
            w_next = tl.load(wp + k0 + BLOCK_K, mask=(rows < N)[:, None] & (k + BLOCK_K < K)[None, :], other=0.0)
            xk = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            if SILU:  # silu(gate) rounded, times up, rounded: as F.silu(gate) * up
                u = tl.load(x_ptr + K + k, mask=k < K, other=0.0).to(tl.float32)
                xk = ((xk / (1.0 + tl.exp(-xk))).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
            if NORM:  # g * rms_norm(x).to(dtype), as model.RMSNorm
                g = tl.load(g_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                xk = (g * (xk * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            acc += w.to(tl.float32) * xk[None, :]
            w = w_next
        y = tl.sum(acc, 1)
        if RES:  # the product rounded, then the residual added: as residual + F.linear(...)
            y = y.to(dt).to(tl.float32) + tl.load(r_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(dt), mask=rows < N)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, sk0, sk1, sv0, sv1,
                           H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        """Program r of H + 2 Hkv rows of qkv [H + 2 Hkv, D]: rotary embedding ('rotate half') of a
        query head into q, of a key head into the cache at pos; a value row into the cache as is."""
        r = tl.program_id(0)
        d = tl.arange(0, D)
        x = tl.load(qkv_ptr + r * D + d)
        cur = tl.load(pos_ptr).to(tl.int64)
        if r < H + HKV:
            half = (d + D // 2) % D                   # rotate half: (-x2, x1)
            rot = tl.load(qkv_ptr + r * D + half).to(tl.float32)
            rot = tl.where(d < D // 2, -rot, rot)
            a = (x.to(tl.float32) * tl.load(cos_ptr + d).to(tl.float32)).to(x.dtype)
            b = (rot * tl.load(sin_ptr + d).to(tl.float32)).to(x.dtype)
            y = (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)
            if r < H:
                tl.store(q_ptr + r * D + d, y)
            else:
                tl.store(k_ptr + (r - H) * sk0 + cur * sk1 + d, y)
        else:
            tl.store(v_ptr + (r - H - HKV) * sv0 + cur * sv1 + d, x)


# linear's launch settings on CUDA per weight shape (N, K) of Llama-3.1-8B, from an H100 sweep against
# cuBLAS inside CUDA graphs (notes/gemv_session18.md); other shapes take "default". Each product is
# launched early (programmatic dependent launch): its first weight tile is read while the previous
# kernel finishes.
LINEAR_CONFIG = {
    "default": dict(block_n=8, block_k=1024, num_warps=4),      # wqkv (6144 x 4096), w13 (28672 x 4096)
    (4096, 4096): dict(block_n=8, block_k=512, num_warps=8),     # wo
    (4096, 14336): dict(block_n=8, block_k=512, num_warps=8),    # w2
    (128256, 4096): dict(block_n=4, block_k=2048, num_warps=4),  # lm_head
}
LINEAR_CPU_CONFIG = dict(block_n=32, block_k=256, num_warps=4)  # the interpreter: few programs, big blocks


def linear(x, w, norm=None, eps=1e-5, silu=False, residual=None):
    """One token's product with an nn.Linear weight w [N, K] in one launch -> y [N] (x's dtype):
    y = [residual +] w @ f(x), f(x) = x [K]; with norm [K], norm * rms_norm(x) as model.RMSNorm;
    with silu, silu(gate) * up of x = [gate, up] [2K]. Same numbers as linear_torch's ops."""
    N, K = w.shape
    if not w.is_contiguous() or x.numel() != (2 if silu else 1) * K or (norm is not None and silu):
        raise ValueError(f"linear wants a contiguous w [N, K], x of {K} values ({2 * K} with silu), and norm or silu, not both")
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    c = LINEAR_CONFIG.get((N, K), LINEAR_CONFIG["default"]) if x.is_cuda else LINEAR_CPU_CONFIG
    pdl = x.is_cuda and gdc_wait is not None
    _linear_kernel[(triton.cdiv(N, c["block_n"]),)](
        x.reshape(-1), w, y, x if norm is None else norm, x if residual is None else residual.reshape(-1),
        eps, N, K, NORM=norm is not None, SILU=silu, RES=residual is not None, PDL=pdl, BLOCK_N=c["block_n"],
        BLOCK_K=c["block_k"], num_warps=c["num_warps"], **(dict(launch_pdl=True) if pdl else {}))
    return y


def rope_cache_write(qkv, cos, sin, cache_k, cache_v, pos, n_heads):
    """qkv [(H + 2 Hkv) * D] one token's projections; cos, sin [D] -> q [H, D] with rotary embedding;
    k (rotated) and v written into the caches [Hkv, N, D] at pos, all in one launch."""
    Hkv, _, D = cache_k.shape
    q = torch.empty(n_heads, D, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(n_heads + 2 * Hkv,)](qkv, cos, sin, q, cache_k, cache_v, pos, cache_k.stride(0),
                                             cache_k.stride(1), cache_v.stride(0), cache_v.stride(1),
                                             H=n_heads, HKV=Hkv, D=D, num_warps=1)
    return q


# ----------------------------------------------------------------------------- dispatch

def _check(q, k, v, pos, idx):
    """Shapes and dtypes always (no host sync); values of pos and idx only for CPU tensors."""
    if q.dim() != 2 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"want q [H, D], k/v [Hkv, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    H, D = q.shape
    Hkv, N, Dk = k.shape
    if Dk != D or N < 1 or Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q/k/v dtypes must match, one of {DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if not isinstance(pos, torch.Tensor) or pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64) \
            or pos.device != k.device:
        raise ValueError(f"pos must be a one-element integer tensor on {k.device}")
    if pos.device.type == "cpu" and not 0 <= int(pos) < N:
        raise ValueError(f"pos must lie in [0, {N - 1}], got {int(pos)}")
    if idx is None:
        return
    if idx.dim() != 2 or idx.shape[0] != Hkv or idx.device != k.device:
        raise ValueError(f"want idx [Hkv={Hkv}, n] on {k.device}; got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
    if idx.device.type == "cpu" and idx.numel() > 0 and int(idx.max()) >= int(pos):  # would read past the cache
        raise ValueError(f"idx values must lie below pos = {int(pos)}, got {int(idx.max())}")


def count_torch(count, k, pos, idx, full=None):
    """What the Triton kernel adds to `count` when given one, in torch ops (no host sync)."""
    dense = k.shape[0] * (pos.view(1) + 1)
    if idx is None:
        count += torch.cat([count.new_ones(2), dense, dense])
        return
    is_dense = count.new_zeros(1) if full is None else (full.view(1) != 0).long()
    n = torch.where(is_dense != 0, dense, (idx >= 0).sum().view(1) + k.shape[0])
    count += torch.cat([count.new_ones(1), is_dense, n, dense])


def attention_flag_torch(q, k, v, pos, idx, scores, full):
    """Reference for the flag: both passes, the dense one's output where the flag is set."""
    dense, probs = attention_torch(q, k, v, pos, None, scores)
    sparse, _ = attention_torch(q, k, v, pos, idx, False)
    return torch.where(full.view(()) != 0, dense, sparse), probs


def decode_attention(q, k, v, pos, idx=None, scores=False, kernel="auto", count=None, full=None):
    """One decoding query (batch 1) attends to cached positions.
    q [H, D]; k, v [Hkv, N, D] with positions 0..pos filled; pos a one-element integer tensor
    (the current token's position); idx None (every position 0..pos) or an integer [Hkv, n] of
    distinct positions in [0, pos) attended besides the current token (entries < 0: empty slots).
    Returns (out [H, D] in q.dtype, probs float32 or None): probs [H, N] for idx=None, zero past
    pos; [H, n + 1] in idx's order then the current token, zero at empty slots.
    kernel: "torch" (reference), "triton", or "auto" (Triton on CUDA, torch on CPU).
    count: None or an int64 [4] tensor on the device, to which the call adds 1 (a layer-step), 1
    if the pass was dense (a full step), the entries it attended (the current token and idx's
    non-empty slots, or 0..pos; summed over KV heads) and the positions a full step would attend
    (pos + 1 per KV head). Triton counts inside the kernel: no launch of its own.
    full: None or a one-element integer tensor on the device, with idx: where it holds nonzero the
    call attends to every position as idx=None does (same launches, same bits), else to idx;
    decided on the GPU, so one CUDA graph serves both. probs is then [H, N] and is written by a
    dense pass only (a sparse one leaves it as it was: read it under the same flag)."""
    _check(q, k, v, pos, idx)
    if full is not None and (idx is None or full.numel() != 1 or full.device != k.device
                             or full.dtype not in (torch.int32, torch.int64, torch.bool)):
        raise ValueError(f"full must be a one-element integer tensor on {k.device}, with idx")
    if count is not None and (count.shape != (4,) or count.dtype != torch.int64 or count.device != k.device):
        raise ValueError(f"count must be an int64 [4] tensor on {k.device}")
    if not use_triton(kernel, q.device):
        if count is not None:
            count_torch(count, k, pos, idx, full)
        if full is not None:
            return attention_flag_torch(q, k, v, pos, idx, scores, full)
        return attention_torch(q, k, v, pos, idx, scores)
    if q.shape[1] < 16 or q.shape[1] & (q.shape[1] - 1):
        raise ValueError(f"kernel='triton' needs a power-of-2 head dim >= 16, got {q.shape[1]}")
    return attention_triton(q, k, v, pos, idx, scores, count=count, full=full)
