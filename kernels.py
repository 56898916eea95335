"""Decode attention for one query token (batch 1): a PyTorch reference and Triton kernels.

decode_attention(q, k, v, idx=None, scores=False, kernel="auto") -> (out, probs)
  q [H, D], k/v [Hkv, T, D] (views of a larger cache are fine), idx [Hkv, n] or None.
  The current token (position T-1) is always attended, as the last attended entry.

The Triton path is split-KV ("flash-decoding"): program (kv head, split) walks one chunk
of the attended entries, loads each K/V row once for the whole GQA group (the group's
query heads are packed into one tl.dot), keeps an online softmax in float32 and writes a
partial (max, sum, acc). A second small kernel merges the splits and, if asked, turns
the scaled logits the first kernel wrote into probabilities with the final log-sum-exp.
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

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import, too
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# idx=None, scores=False on CUDA. SDPA is 3-16% faster in GPU time alone (notes/kernels.md), but in the
# model's decode loop, on the cache view, it cost 80.6 ms/step against Triton's 37.5 (8B shapes, 8K, H100).
AUTO_DENSE = "triton"


# ----------------------------------------------------------------------------- reference

def attention_torch(q, k, v, idx=None, scores=False):
    """Readable reference: gather, float32 matmul on a [Hkv, G, D] view, softmax, matmul.
    One code path whatever `scores` is, so `out` is bitwise the same either way."""
    H, D = q.shape
    Hkv, T, _ = k.shape
    if idx is not None:  # attended positions: idx's order, then the current token
        cur = torch.full((Hkv, 1), T - 1, dtype=torch.long, device=k.device)
        pos = torch.cat([idx.long(), cur], dim=1)[:, :, None].expand(-1, -1, D)  # [Hkv, n+1, D]
        k, v = k.gather(1, pos), v.gather(1, pos)
    qg = q.view(Hkv, H // Hkv, D).float()                          # [Hkv, G, D]
    att = qg @ k.float().transpose(1, 2) / math.sqrt(D)            # [Hkv, G, n_att]
    p = att.softmax(dim=-1)
    out = (p @ v.float()).reshape(H, D).to(q.dtype)                # [H, D]
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
        w = tl.exp2(m - m_max)                        # weight of each split
        l_sum = tl.sum(l * w, 0)
        out = tl.sum(acc * w[:, None], 0) / l_sum
        tl.store(out_ptr + h * D + d, out.to(out_ptr.dtype.element_ty))
        return m_max, l_sum

    @triton.jit(do_not_specialize=["T", "n_idx", "n_att", "chunk", "S"])
    def _split_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, m_ptr, l_ptr, acc_ptr, s_ptr,
                      sk0, sk1, sv0, sv1, si0, T, n_idx, n_att, chunk, S, qk_scale,
                      G: tl.constexpr, D: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HAS_IDX: tl.constexpr,
                      SCORES: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        kvh = tl.program_id(0)
        split = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)                     # query head within the group (padded)
        d = tl.arange(0, D)
        h = kvh * G + g                               # [BLOCK_G] query head
        hmask = g < G
        q = tl.load(q_ptr + h[:, None] * D + d[None, :], mask=hmask[:, None], other=0.0)
        if UPCAST:  # the interpreter's bf16 math is broken: compute in float32
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_G], -1e30, tl.float32)  # finite: an empty split gives no NaN
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        start = split * chunk
        for j0 in range(start, start + chunk, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)            # [BLOCK_N] attended entry
            valid = j < n_att
            if HAS_IDX:  # entries 0..n-1 come from idx, entry n is the current token
                pos = tl.load(idx_ptr + kvh * si0 + j, mask=j < n_idx, other=0)
                pos = tl.where(j < n_idx, pos, T - 1).to(tl.int64)
            else:
                pos = j.to(tl.int64)
            kk = tl.load(k_ptr + kvh * sk0 + pos[:, None] * sk1 + d[None, :],
                         mask=valid[:, None], other=0.0)   # [BLOCK_N, D]
            vv = tl.load(v_ptr + kvh * sv0 + pos[:, None] * sv1 + d[None, :],
                         mask=valid[:, None], other=0.0)
            if UPCAST:
                kk = kk.to(tl.float32)
                vv = vv.to(tl.float32)
            # scaled logits in base 2 (exp2 is cheaper): [BLOCK_G, BLOCK_N]
            s = tl.dot(q, tl.trans(kk), input_precision=PREC) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            if SCORES:  # written once; the combine kernel normalises them in place
                tl.store(s_ptr + h[:, None] * n_att + j[None, :], s,
                         mask=hmask[:, None] & valid[None, :])
            # online softmax
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
            m_i = m_new
        # partials, laid out [H, S] and [H, S, D]
        tl.store(m_ptr + h * S + split, m_i, mask=hmask)
        tl.store(l_ptr + h * S + split, l_i, mask=hmask)
        tl.store(acc_ptr + (h[:, None] * S + split) * D + d[None, :], acc, mask=hmask[:, None])

    @triton.jit(do_not_specialize=["n_att", "S"])
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, s_ptr, n_att, S,
                        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
                        SCORES: tl.constexpr):
        """Grid (H, blocks of probs). Program (h, 0) writes out[h]; every program turns
        one block of head h's scaled logits into probabilities, in place."""
        h = tl.program_id(0)
        b = tl.program_id(1)
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
            j = b * BLOCK_P + tl.arange(0, BLOCK_P)
            x = tl.load(s_ptr + h * n_att + j, mask=j < n_att, other=float("-inf"))
            tl.store(s_ptr + h * n_att + j, tl.exp2(x - lse), mask=j < n_att)


# Launch settings on CUDA, tuned on an H100 for Llama-3.1-8B shapes (bench_attention.py
# --sweep); `splits` is the number of programs per KV head at long lengths.
CUDA_CONFIG = {
    "sparse": dict(block_n=64, num_warps=4, num_stages=2, splits=64),
    "dense": dict(block_n=64, num_warps=4, num_stages=3, splits=32),
}
# Interpreter: few programs, big blocks.
CPU_CONFIG = dict(block_n=128, num_warps=4, num_stages=1, splits=2)


def attention_triton(q, k, v, idx=None, scores=False, block_n=None, num_splits=None,
                     num_warps=None, num_stages=None, exact_splits=False):
    """Split-KV Triton decode. Tuning arguments are for tests and the benchmark only;
    exact_splits=True keeps num_splits even if some splits get no entry (tests);"""
    H, D = q.shape
    Hkv, T, _ = k.shape
    G = H // Hkv
    n_idx = 0 if idx is None else idx.shape[1]
    n_att = T if idx is None else n_idx + 1
    cfg = CUDA_CONFIG["dense" if idx is None else "sparse"] if q.is_cuda else CPU_CONFIG
    block_n = block_n or cfg["block_n"]
    S = num_splits or cfg["splits"]
    blocks = triton.cdiv(n_att, block_n)
    if not exact_splits:
        S = max(1, min(S, blocks))
    chunk = triton.cdiv(blocks, S) * block_n          # entries per split, whole blocks
    if not exact_splits:
        S = triton.cdiv(n_att, chunk)                 # so that no split is empty
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
    probs = torch.empty(H, n_att, dtype=torch.float32, device=dev) if scores else m
    idx_arg = idx if idx is not None else m           # unused when HAS_IDX is False
    si0 = idx.stride(0) if idx is not None else 0
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    warps = num_warps or cfg["num_warps"]
    block_s = max(2, triton.next_power_of_2(S))
    _split_kernel[(Hkv, S)](
        q, k, v, idx_arg, m, l, acc, probs,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), si0, T, n_idx, n_att, chunk, S,
        math.log2(math.e) / math.sqrt(D),
        G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,
        HAS_IDX=idx is not None, SCORES=scores, UPCAST=INTERPRET, PREC=prec,
        num_warps=warps, num_stages=num_stages or cfg["num_stages"])
    block_p = 1024 if dev.type == "cuda" else 4096
    nb = triton.cdiv(n_att, block_p) if scores else 1
    _combine_kernel[(H, nb)](m, l, acc, out, probs, n_att, S, D=D, BLOCK_S=block_s,
                             BLOCK_P=block_p, SCORES=scores, num_warps=warps)
    return out, (probs if scores else None)


# ----------------------------------------------------------------------------- dispatch

def _check(q, k, v, idx):
    """Shapes and dtypes always (no host sync); index range only for CPU tensors."""
    if q.dim() != 2 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"want q [H, D], k/v [Hkv, T, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    H, D = q.shape
    Hkv, T, Dk = k.shape
    if Dk != D or T < 1 or Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q/k/v dtypes must match, one of {DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if idx is None:
        return
    if idx.dim() != 2 or idx.shape[0] != Hkv or idx.device != k.device:
        raise ValueError(f"want idx [Hkv={Hkv}, n] on {k.device}; got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
    if idx.device.type == "cpu" and idx.numel() > 0:  # out of range would segfault
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= T - 1:
            raise ValueError(f"idx values must lie in [0, {T - 2}], got [{lo}, {hi}]")


def _sdpa(q, k, v):
    """Dense attention without scores through torch SDPA (GQA without copies)."""
    out = F.scaled_dot_product_attention(q[None, :, None], k[None], v[None], enable_gqa=True)
    return out[0, :, 0], None


def decode_attention(q, k, v, idx=None, scores=False, kernel="auto"):
    """One decoding query (batch 1) attends to cached positions.
    q [H, D]; k, v [Hkv, T, D] (current token at T-1); idx None (all T positions) or an
    integer [Hkv, n] of distinct positions in [0, T-1) attended besides the current token.
    Returns (out [H, D] in q.dtype, probs [H, n_att] float32 or None); probs follow the
    attended order: idx's order then the current token, or 0..T-1 for idx=None.
    kernel: "torch" (reference), "triton", or "auto" (Triton on CUDA, torch on CPU)."""
    _check(q, k, v, idx)
    if kernel == "auto":
        if q.device.type != "cuda":
            kernel = "torch"
        elif idx is None and not scores and AUTO_DENSE == "sdpa":
            return _sdpa(q, k, v)
        else:
            kernel = "triton" if triton is not None else "torch"
    if kernel == "torch":
        return attention_torch(q, k, v, idx, scores)
    if kernel != "triton":
        raise ValueError(f"kernel must be 'torch', 'triton' or 'auto', got {kernel!r}")
    if triton is None:
        raise ValueError("kernel='triton' needs the triton package")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                         "set before triton is imported")
    if q.shape[1] < 16 or q.shape[1] & (q.shape[1] - 1):
        raise ValueError(f"kernel='triton' needs a power-of-2 head dim >= 16, got {q.shape[1]}")
    return attention_triton(q, k, v, idx, scores)
