"""Tests for kernels.decode_attention. On CPU the Triton kernels run in the interpreter
(TRITON_INTERPRET=1, set by the root conftest.py before triton is imported); on a GPU
the same tests compile and run them for real."""
import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # same as conftest.py, in case this file runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given, settings, strategies as st

import kernels
from kernels import attention_triton, decode_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = kernels.triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
FAST = settings(max_examples=30, deadline=None, derandomize=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # out, abs+rel


def make(Hkv, G, T, D, dtype, seed, n=None, sort=False, extra=37, qscale=2.0):
    """q [H, D] and k, v as [:, :T] views of a larger [Hkv, T+extra, D] buffer."""
    gen = torch.Generator().manual_seed(seed)
    q = (qscale * torch.randn(Hkv * G, D, generator=gen)).to(dtype)
    kb = torch.randn(Hkv, T + extra, D, generator=gen).to(dtype)
    vb = torch.randn(Hkv, T + extra, D, generator=gen).to(dtype)
    idx = None
    if n is not None:  # n distinct positions in [0, T-1) per KV head
        idx = torch.stack([torch.randperm(T - 1, generator=gen)[:n] for _ in range(Hkv)])
        idx = idx.sort(dim=1).values if sort else idx
    to = lambda x: None if x is None else x.to(DEV)
    return to(q), to(kb)[:, :T], to(vb)[:, :T], to(idx)


def naive64(q, k, v, idx):
    """Float64 loops over query heads: the formula, written out."""
    H, D = q.shape
    Hkv, T, _ = k.shape
    outs, probs = [], []
    for h in range(H):
        kv = h // (H // Hkv)
        pos = list(range(T)) if idx is None else idx[kv].tolist() + [T - 1]
        kk, vv = k[kv, pos].double(), v[kv, pos].double()
        logits = kk @ q[h].double() / math.sqrt(D)
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        outs.append(p @ vv)
        probs.append(p)
    return torch.stack(outs), torch.stack(probs)


def close(a, b, tol):
    assert not torch.isnan(a).any()
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- reference

@FAST
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 4, 8]), T=st.integers(1, 70),
       D=st.sampled_from([8, 16, 32]), frac=st.floats(0, 1), dense=st.booleans(),
       seed=st.integers(0, 2**16))
def test_reference_vs_float64(Hkv, G, T, D, frac, dense, seed):
    n = None if dense else int(frac * (T - 1))
    q, k, v, idx = make(Hkv, G, T, D, torch.float32, seed, n)
    q, k, v, idx = [x if x is None else x.cpu() for x in (q, k, v, idx)]
    out, p = decode_attention(q, k, v, idx, scores=True, kernel="torch")
    out64, p64 = naive64(q, k, v, idx)
    close(out, out64, 1e-5)
    close(p, p64, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [True, False])
def test_reference_scores_flag_bitwise(dtype, dense):
    q, k, v, idx = make(2, 4, 50, 16, dtype, 1, None if dense else 20)
    q, k, v, idx = [x if x is None else x.cpu() for x in (q, k, v, idx)]
    a, _ = decode_attention(q, k, v, idx, scores=False, kernel="torch")
    b, p = decode_attention(q, k, v, idx, scores=True, kernel="torch")
    c, _ = decode_attention(q, k, v, idx)  # auto on CPU is the reference
    assert torch.equal(a, b) and torch.equal(a, c)
    assert p.dtype == torch.float32 and p.shape == (8, 50 if dense else 21)


def test_validation():
    q, k, v, idx = [x.cpu() for x in make(2, 4, 20, 16, torch.float32, 2, 5)]
    with pytest.raises(ValueError, match="idx values"):
        decode_attention(q, k, v, torch.full((2, 3), 19))  # the current token is not allowed
    with pytest.raises(ValueError, match="idx values"):
        decode_attention(q, k, v, torch.full((2, 3), -1))
    with pytest.raises(ValueError):
        decode_attention(q, k, v, idx[:1])                 # wrong number of KV heads
    with pytest.raises(ValueError):
        decode_attention(q[:3], k, v)                      # H not a multiple of Hkv
    with pytest.raises(ValueError):
        decode_attention(q, k.half(), v)
    with pytest.raises(ValueError):
        decode_attention(q, k, v, idx.float())
    with pytest.raises(ValueError):
        decode_attention(q, k, v, kernel="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    q, k, v, _ = [x.cpu() for x in make(1, 1, 4, 16, torch.float32, 3, 0)]
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        decode_attention(q, k, v, kernel="triton")


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels; "
            "q, k = torch.randn(4, 8), torch.randn(2, 5, 8); "
            "o, p = kernels.decode_attention(q, k, k, torch.tensor([[0], [3]]), True); "
            "assert kernels.triton is None and p.shape == (4, 2)")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=here)


# ----------------------------------------------------------------------------- Triton

@needs_triton
@FAST
@given(Hkv=st.integers(1, 2), G=st.sampled_from([1, 4, 8]), T=st.integers(1, 300),
       D=st.sampled_from([32, 64]), dtype=st.sampled_from(DTYPES), frac=st.floats(0, 1),
       dense=st.booleans(), sort=st.booleans(), scores=st.booleans(),
       idx32=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_matches_reference(Hkv, G, T, D, dtype, frac, dense, sort, scores, idx32, seed):
    n = None if dense else int(frac * (T - 1))
    q, k, v, idx = make(Hkv, G, T, D, dtype, seed, n, sort)
    if idx is not None and idx32:
        idx = idx.int()
    ref, pref = decode_attention(q, k, v, idx, scores=True, kernel="torch")
    out, p = decode_attention(q, k, v, idx, scores=scores, kernel="triton")
    assert out.dtype == dtype and out.shape == q.shape
    close(out, ref, TOL[dtype])
    if scores:
        close(p, pref, 1e-4)
        close(p.sum(-1), torch.ones(q.shape[0], device=DEV), 1e-5)
    else:
        assert p is None


@needs_triton
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_only_current_token(G, dtype):
    q, k, v, idx = make(2, G, 77, 32, dtype, 4, n=0)                # idx is [Hkv, 0]
    out, p = decode_attention(q, k, v, idx, scores=True, kernel="triton")
    want = v[:, -1].repeat_interleave(G, dim=0)                     # [H, D]
    close(out, want, TOL[dtype])
    assert p.shape == (2 * G, 1) and torch.allclose(p, torch.ones_like(p))
    # T == 1: the cache holds the current token alone
    out1, p1 = decode_attention(q, k[:, :1], v[:, :1], scores=True, kernel="triton")
    close(out1, v[:, 0].repeat_interleave(G, dim=0), TOL[dtype])
    assert torch.allclose(p1, torch.ones_like(p1))


@needs_triton
@pytest.mark.parametrize("T", [2, 129, 257])                          # block is 128 in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_positions_equals_dense(T, dtype):
    q, k, v, idx = make(2, 4, T, 64, dtype, T, n=T - 1)               # a permutation of 0..T-2
    dense, pd = decode_attention(q, k, v, scores=True, kernel="triton")
    sparse, ps = decode_attention(q, k, v, idx, scores=True, kernel="triton")
    ref, _ = decode_attention(q, k, v, kernel="torch")
    close(sparse, dense, TOL[dtype])
    close(dense, ref, TOL[dtype])
    G = 4
    perm = torch.cat([idx, torch.full((2, 1), T - 1, device=DEV)], 1)  # [Hkv, T]
    perm = perm.repeat_interleave(G, dim=0)                           # [H, T] per query head
    close(ps, pd.gather(1, perm), 1e-5)


@needs_triton
@pytest.mark.parametrize("dense", [True, False])
def test_empty_splits_and_small_blocks(dense):
    """More splits than blocks: trailing splits hold no entry and must not give NaN."""
    q, k, v, idx = make(2, 8, 45, 32, torch.float32, 5, None if dense else 30)
    ref, pref = decode_attention(q, k, v, idx, scores=True, kernel="torch")
    for splits in (1, 3, 7):
        out, p = attention_triton(q, k, v, idx, scores=True, block_n=16, num_splits=splits,
                                  exact_splits=True)
        close(out, ref, 2e-5)
        close(p, pref, 1e-5)
        out, _ = attention_triton(q, k, v, idx, block_n=16, num_splits=splits, exact_splits=True)
        close(out, ref, 2e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dense", [True, False])
def test_triton_scores_flag_bitwise(dtype, dense):
    """scores=True only adds stores: `out` must not change by a bit."""
    q, k, v, idx = make(2, 4, 200, 64, dtype, 6, None if dense else 60)
    a, _ = decode_attention(q, k, v, idx, scores=False, kernel="triton")
    b, _ = decode_attention(q, k, v, idx, scores=True, kernel="triton")
    assert torch.equal(a, b)


@needs_triton
def test_contiguous_and_strided_inputs_agree():
    q, k, v, idx = make(2, 4, 100, 32, torch.float32, 7, n=40)
    a, pa = decode_attention(q, k, v, idx, scores=True, kernel="triton")
    b, pb = decode_attention(q, k.contiguous(), v.contiguous(), idx.t().contiguous().t(),
                             scores=True, kernel="triton")
    close(a, b, 1e-6)
    close(pa, pb, 1e-7)


@pytest.mark.skipif(DEV != "cuda", reason="auto uses torch SDPA only on CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_dense_on_cuda(dtype):
    q, k, v, _ = make(8, 4, 300, 64, dtype, 8)
    out, p = decode_attention(q, k, v)                                # SDPA (AUTO_DENSE)
    ref, _ = decode_attention(q, k, v, kernel="torch")
    assert p is None
    close(out, ref, max(TOL[dtype], 1e-4))
