"""Tests for kernels.decode_attention. On CPU the Triton kernels run in the interpreter
(TRITON_INTERPRET=1, set by the root conftest.py before triton is imported); on a GPU
the same tests compile and run them for real.

Every cache is a buffer longer than the filled part: positions past pos hold NaN, so a
kernel that reads them gives NaN, which close() rejects."""
import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # same as conftest.py, in case this file runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import example, given, settings, strategies as st

import kernels
from kernels import attention_triton, decode_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = kernels.triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
needs_cuda = pytest.mark.skipif(DEV != "cuda", reason="needs a GPU")
FAST = settings(max_examples=30, deadline=None, derandomize=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # out, abs+rel


def make(Hkv, G, T, D, dtype, seed, n=None, sort=False, extra=37, empty=0, pos32=False,
         dev=DEV):
    """q [H, D]; k, v [Hkv, T+extra, D], views of a still larger buffer, positions 0..T-1
    filled and the rest NaN; pos = T-1 as a one-element tensor; idx [Hkv, n] distinct
    positions in [0, T-1) with `empty` slots per row set to -1."""
    gen = torch.Generator().manual_seed(seed)
    q = (2.0 * torch.randn(Hkv * G, D, generator=gen)).to(dtype)
    kb = torch.randn(Hkv, T + extra + 3, D, generator=gen).to(dtype)
    vb = torch.randn(Hkv, T + extra + 3, D, generator=gen).to(dtype)
    kb[:, T:], vb[:, T:] = float("nan"), float("nan")          # garbage past pos
    pos = torch.tensor([T - 1], dtype=torch.int32 if pos32 else torch.int64)
    idx = None
    if n is not None:
        idx = torch.stack([torch.randperm(T - 1, generator=gen)[:n] for _ in range(Hkv)])
        idx = idx.sort(dim=1).values if sort else idx
        holes = torch.stack([torch.randperm(n, generator=gen)[:empty] for _ in range(Hkv)])
        idx = idx.scatter(1, holes, -1)
    to = lambda x: None if x is None else x.to(dev)
    return to(q), to(kb)[:, :T + extra], to(vb)[:, :T + extra], to(pos), to(idx)


def naive64(q, k, v, pos, idx):
    """Float64 loops over query heads: the formula, written out. Reads only positions
    0..pos (dense) or idx's non-empty slots then pos (sparse)."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    H, D = q.shape
    Hkv, N, _ = k.shape
    cur = int(pos)
    outs, probs = [], []
    for h in range(H):
        kv = h // (H // Hkv)
        slots = list(range(N)) if idx is None else idx[kv].tolist() + [cur]
        keep = [i for i, s in enumerate(slots) if 0 <= s <= cur]
        at = [slots[i] for i in keep]
        logits = k[kv, at].double() @ q[h].double() / math.sqrt(D)
        w = torch.exp(logits - logits.max())
        w = w / w.sum()
        p = torch.zeros(len(slots), dtype=torch.float64)
        p[keep] = w
        outs.append(w @ v[kv, at].double())
        probs.append(p)
    return torch.stack(outs), torch.stack(probs)


def close(a, b, tol):
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=tol, rtol=tol)


def check_probs(p, idx, T):
    """Rows sum to 1; exact zeros past pos (dense) and at empty slots (sparse)."""
    close(p.sum(-1), torch.ones(p.shape[0]), 1e-5)
    if idx is None:
        assert (p[:, T:] == 0).all()
    else:
        G = p.shape[0] // idx.shape[0]
        hole = (idx < 0).repeat_interleave(G, dim=0)                    # [H, n]
        assert (p[:, :-1][hole] == 0).all()


# ----------------------------------------------------------------------------- reference

@FAST
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 4, 8]), T=st.integers(1, 70),
       extra=st.integers(0, 20), D=st.sampled_from([8, 16, 32]), frac=st.floats(0, 1),
       efrac=st.floats(0, 1), dense=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_vs_float64(Hkv, G, T, extra, D, frac, efrac, dense, seed):
    n = None if dense else int(frac * (T - 1))
    empty = 0 if dense else int(efrac * n)
    q, k, v, pos, idx = make(Hkv, G, T, D, torch.float32, seed, n, extra=extra, empty=empty,
                             dev="cpu")
    out, p = decode_attention(q, k, v, pos, idx, scores=True, kernel="torch")
    out64, p64 = naive64(q, k, v, pos, idx)
    close(out, out64, 1e-5)
    close(p, p64, 1e-6)
    check_probs(p, idx, T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [True, False])
def test_reference_scores_flag_bitwise(dtype, dense):
    q, k, v, pos, idx = make(2, 4, 50, 16, dtype, 1, None if dense else 20, empty=3, dev="cpu")
    a, _ = decode_attention(q, k, v, pos, idx, scores=False, kernel="torch")
    b, p = decode_attention(q, k, v, pos, idx, scores=True, kernel="torch")
    c, _ = decode_attention(q, k, v, pos, idx)  # auto on CPU is the reference
    assert torch.equal(a, b) and torch.equal(a, c)
    assert p.dtype == torch.float32 and p.shape == (8, 87 if dense else 21)


def test_validation():
    q, k, v, pos, idx = make(2, 4, 20, 16, torch.float32, 2, 5, dev="cpu")
    with pytest.raises(ValueError, match="idx values"):
        decode_attention(q, k, v, pos, torch.full((2, 3), 19))  # the current token is not allowed
    with pytest.raises(ValueError, match="pos"):
        decode_attention(q, k, v, 19)                            # pos must be a tensor
    with pytest.raises(ValueError, match="pos"):
        decode_attention(q, k, v, torch.tensor([19.0]))
    with pytest.raises(ValueError, match="pos"):
        decode_attention(q, k, v, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="pos"):
        decode_attention(q, k, v, torch.tensor([k.shape[1]]))   # past the buffer
    with pytest.raises(ValueError):
        decode_attention(q, k, v, pos, idx[:1])                 # wrong number of KV heads
    with pytest.raises(ValueError):
        decode_attention(q[:3], k, v, pos)                      # H not a multiple of Hkv
    with pytest.raises(ValueError):
        decode_attention(q, k.half(), v, pos)
    with pytest.raises(ValueError):
        decode_attention(q, k, v, pos, idx.float())
    with pytest.raises(ValueError):
        decode_attention(q, k, v, pos, kernel="cuda")
    decode_attention(q, k, v, pos, torch.full((2, 3), -1))      # all slots empty is fine


@needs_triton
def test_triton_on_cpu_needs_interpreter(monkeypatch):
    q, k, v, pos, _ = make(1, 1, 4, 16, torch.float32, 3, dev="cpu")
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        decode_attention(q, k, v, pos, kernel="triton")


def test_every_entry_point_names_a_bad_kernel():
    """All entry points take `kernel` through kernels.use_triton: an unknown name is a ValueError."""
    q, k, probs = torch.randn(4, 32, 16), torch.randn(2, 32, 16), torch.rand(4, 9)
    idx, rank, pos = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8), torch.tensor([20])
    calls = [lambda kernel: kernels.column_scores(q, k, kernel=kernel),
             lambda kernel: kernels.pooled_top(probs, 2, 3, 4, kernel=kernel),
             lambda kernel: kernels.join(idx, rank, pos, kernel=kernel),
             lambda kernel: kernels.h2o_update(probs, idx, rank, pos, 4, kernel=kernel),
             lambda kernel: kernels.similarity_check(q[:, 0], torch.randn(16), 0.5, kernel=kernel)]
    for call in calls:
        call("torch")
        with pytest.raises(ValueError, match="kernel must be"):
            call("cuda")


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels; "
            "q, k = torch.randn(4, 8), torch.randn(2, 5, 8); "
            "idx = torch.tensor([[0], [3]]); "
            "o, p = kernels.decode_attention(q, k, k, torch.tensor([4]), idx, True); "
            "assert kernels.triton is None and p.shape == (4, 2)")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=here)


# ----------------------------------------------------------------------------- Triton

@needs_triton
@settings(FAST, max_examples=60 if DEV == "cpu" else 30)  # on a GPU most examples compile
@given(Hkv=st.integers(1, 2), G=st.sampled_from([1, 4, 8]), T=st.integers(1, 300),
       extra=st.integers(0, 40), D=st.sampled_from([32, 64]), dtype=st.sampled_from(DTYPES),
       frac=st.floats(0, 1), efrac=st.floats(0, 1), dense=st.booleans(), sort=st.booleans(),
       scores=st.booleans(), idx32=st.booleans(), pos32=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_matches_reference(Hkv, G, T, extra, D, dtype, frac, efrac, dense, sort, scores,
                                  idx32, pos32, seed):
    n = None if dense else int(frac * (T - 1))
    empty = 0 if dense else int(efrac * n)
    q, k, v, pos, idx = make(Hkv, G, T, D, dtype, seed, n, sort, extra, empty, pos32)
    if idx is not None and idx32:
        idx = idx.int()
    ref, pref = decode_attention(q, k, v, pos, idx, scores=True, kernel="torch")
    out, p = decode_attention(q, k, v, pos, idx, scores=scores, kernel="triton")
    assert out.dtype == dtype and out.shape == q.shape
    close(out, ref, TOL[dtype])
    close(out, naive64(q, k, v, pos, idx)[0], TOL[dtype])
    if scores:
        close(p, pref, 1e-4)
        check_probs(p, idx, T)
    else:
        assert p is None


@needs_triton
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_only_current_token(G, dtype):
    q, k, v, pos, idx = make(2, G, 77, 32, dtype, 4, n=0)             # idx is [Hkv, 0]
    want = v[:, 76].repeat_interleave(G, dim=0)                       # [H, D]
    for sel in (idx, torch.full((2, 5), -1, device=DEV)):             # no slot; 5 empty slots
        out, p = decode_attention(q, k, v, pos, sel, scores=True, kernel="triton")
        close(out, want, TOL[dtype])
        assert p.shape == (2 * G, sel.shape[1] + 1)
        assert (p[:, -1] == 1).all() and (p[:, :-1] == 0).all()
    # pos == 0: the cache holds the current token alone, the rest of the buffer is NaN
    q, k, v, pos, _ = make(2, G, 1, 32, dtype, 4)
    out1, p1 = decode_attention(q, k, v, pos, scores=True, kernel="triton")
    close(out1, v[:, 0].repeat_interleave(G, dim=0), TOL[dtype])
    assert (p1[:, 0] == 1).all() and (p1[:, 1:] == 0).all()


@needs_triton
@pytest.mark.parametrize("T", [2, 129, 257])                          # block is 128 in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_positions_equals_dense(T, dtype):
    q, k, v, pos, idx = make(2, 4, T, 64, dtype, T, n=T - 1)          # a permutation of 0..T-2
    dense, pd = decode_attention(q, k, v, pos, scores=True, kernel="triton")
    sparse, ps = decode_attention(q, k, v, pos, idx, scores=True, kernel="triton")
    ref, _ = decode_attention(q, k, v, pos, kernel="torch")
    close(sparse, dense, TOL[dtype])
    close(dense, ref, TOL[dtype])
    perm = torch.cat([idx, pos.expand(2, 1)], 1)                      # [Hkv, T]
    perm = perm.repeat_interleave(4, dim=0)                           # [H, T] per query head
    close(ps, pd.gather(1, perm), 1e-5)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_slots_are_skipped(kernel):
    """idx with empty slots (-1) == the same idx with those slots removed; probs 0 there."""
    q, k, v, pos, idx = make(2, 4, 150, 32, torch.float32, 11, n=60)
    holes = torch.tensor([0, 7, 8, 30, 59], device=DEV)               # first, a run, last
    keep = torch.ones(60, dtype=torch.bool, device=DEV)
    keep[holes] = False
    with_holes = idx.clone()
    with_holes[:, holes] = -1
    a, pa = decode_attention(q, k, v, pos, with_holes, scores=True, kernel=kernel)
    b, pb = decode_attention(q, k, v, pos, idx[:, keep], scores=True, kernel=kernel)
    close(a, b, 1e-6)
    close(pa[:, torch.cat([keep, torch.tensor([True], device=DEV)])], pb, 1e-6)  # different split layouts: rounding differs
    assert (pa[:, holes] == 0).all()


@needs_triton
@pytest.mark.parametrize("dense", [True, False])
def test_empty_splits_and_small_blocks(dense):
    """More splits than blocks: trailing splits hold no entry and must not give NaN."""
    q, k, v, pos, idx = make(2, 8, 45, 32, torch.float32, 5, None if dense else 30, empty=20)
    ref, pref = decode_attention(q, k, v, pos, idx, scores=True, kernel="torch")
    for splits in (1, 3, 7):
        out, p = attention_triton(q, k, v, pos, idx, scores=True, block_n=16, num_splits=splits,
                                  exact_splits=True)
        close(out, ref, 2e-5)
        close(p, pref, 1e-5)
        out, _ = attention_triton(q, k, v, pos, idx, block_n=16, num_splits=splits,
                                  exact_splits=True)
        close(out, ref, 2e-5)


@needs_triton
@pytest.mark.parametrize("flag", [None, 0, 1])
def test_prefetch_changes_no_bit(flag):
    """idx's next block read ahead (CUDA's sparse config) or in its own iteration (the dense
    config, which a flagged call uses): the same bits, over blocks, splits and empty slots."""
    q, k, v, pos, idx = make(2, 4, 150, 32, torch.float32, 23, n=100, empty=10)
    full = None if flag is None else torch.tensor([flag], device=DEV)
    got = [attention_triton(q, k, v, pos, idx, scores=True, block_n=16, num_splits=3, full=full, prefetch=pf)
           for pf in (False, True)]
    assert torch.equal(got[0][0], got[1][0])
    assert flag == 0 or torch.equal(got[0][1], got[1][1])  # flag 0 writes no probabilities


class Spy:
    """Stands in for a Triton kernel: records each launch's grid and arguments (tensors by
    shape, dtype and strides), then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            desc = lambda a: (a.shape, a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a
            self.launches.append((grid, [desc(a) for a in args], kw))
            return self.kernel[grid](*args, **kw)
        return launch


@needs_triton
def test_launch_does_not_depend_on_pos(monkeypatch):
    """Two positions in one buffer: the same grids and launch arguments (so one CUDA graph
    serves both), and both results right."""
    split, combine = Spy(kernels._split_kernel), Spy(kernels._combine_kernel)
    monkeypatch.setattr(kernels, "_split_kernel", split)
    monkeypatch.setattr(kernels, "_combine_kernel", combine)
    q, k, v, _, _ = make(2, 4, 260, 32, torch.float32, 12, extra=0)   # 260 filled, no NaN
    seen = []
    for cur in (40, 259):
        pos = torch.tensor([cur], device=DEV)
        idx = torch.full((2, 50), -1, device=DEV)
        idx[:, :30] = torch.randperm(cur, device=DEV)[:30]
        split.launches, combine.launches = [], []
        for sel in (None, idx):
            out, p = decode_attention(q, k, v, pos, sel, scores=True, kernel="triton")
            want, pwant = naive64(q, k, v, pos, sel)
            close(out, want, 2e-5)
            close(p, pwant, 1e-5)
        seen.append((split.launches, combine.launches))
    assert len(seen[0][0]) == 2 and seen[0] == seen[1]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dense", [True, False])
def test_triton_scores_flag_bitwise(dtype, dense):
    """scores=True only adds stores: `out` must not change by a bit."""
    q, k, v, pos, idx = make(2, 4, 200, 64, dtype, 6, None if dense else 60, empty=10)
    a, _ = decode_attention(q, k, v, pos, idx, scores=False, kernel="triton")
    b, _ = decode_attention(q, k, v, pos, idx, scores=True, kernel="triton")
    assert torch.equal(a, b)


@needs_triton
def test_contiguous_and_strided_inputs_agree():
    q, k, v, pos, idx = make(2, 4, 100, 32, torch.float32, 7, n=40, empty=5)
    a, pa = decode_attention(q, k, v, pos, idx, scores=True, kernel="triton")
    b, pb = decode_attention(q, k.contiguous(), v.contiguous(), pos, idx.t().contiguous().t(),
                             scores=True, kernel="triton")
    close(a, b, 1e-6)
    close(pa, pb, 1e-6)


# ----------------------------------------------------------------------------- CUDA only

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_is_triton_on_cuda(dtype):
    q, k, v, pos, idx = make(8, 4, 300, 64, dtype, 8, n=100, empty=10)
    for sel in (None, idx):
        out, p = decode_attention(q, k, v, pos, sel)
        tri, _ = decode_attention(q, k, v, pos, sel, kernel="triton")
        assert p is None and torch.equal(out, tri)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_at_any_position(dtype):
    """Capture dense-with-scores and sparse once; replay at other positions (pos, idx, q and
    the cache updated in place), each replay equal to the reference."""
    Hkv, G, N, D, n = 2, 4, 1000, 64, 40
    gen = torch.Generator().manual_seed(13)
    q = torch.empty(Hkv * G, D, dtype=dtype, device=DEV)
    k, v = torch.empty(2, Hkv, N, D, dtype=dtype, device=DEV)
    pos = torch.zeros(1, dtype=torch.int64, device=DEV)
    idx = torch.empty(Hkv, n, dtype=torch.int32, device=DEV)

    def set_position(cur):  # fresh inputs in the same buffers; NaN past cur
        q.copy_(2 * torch.randn(Hkv * G, D, generator=gen))
        for buf in (k, v):
            buf.copy_(torch.randn(Hkv, N, D, generator=gen))
            buf[:, cur + 1:] = float("nan")
        pos.fill_(cur)
        sel = torch.stack([torch.randperm(cur, generator=gen)[:n] for _ in range(Hkv)])
        idx.fill_(-1)                                               # fewer than n before pos n
        idx[:, :sel.shape[1]] = sel.to(DEV)

    step = lambda: (decode_attention(q, k, v, pos, scores=True, kernel="triton"),
                    decode_attention(q, k, v, pos, idx, scores=True, kernel="triton"))
    set_position(500)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                                   # compile outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (out_d, p_d), (out_s, p_s) = step()
    for cur in (700, 20, 999, 0):
        set_position(cur)
        graph.replay()
        torch.cuda.synchronize()
        for sel, out, p in ((None, out_d, p_d), (idx, out_s, p_s)):
            want, pwant = naive64(q, k, v, pos, sel)
            close(out, want, TOL[dtype])
            close(p, pwant, 1e-4)
            check_probs(p, sel, cur + 1)


# ----------------------------------------------------------------------------- prompt column sums

def columns64(q, k):
    """Float64 loops: for each position j, the sum over queries i >= j of the group's largest
    causal-softmax probability at j."""
    H, L, D = q.shape
    Hkv = k.shape[0]
    G = H // Hkv
    out = torch.zeros(Hkv, L, dtype=torch.float64)
    q, k = q.cpu().double(), k.cpu().double()
    for kvh in range(Hkv):
        for i in range(L):
            p = torch.stack([(q[kvh * G + g, i] @ k[kvh, :i + 1].T / math.sqrt(D)).softmax(0)
                             for g in range(G)])
            out[kvh, :i + 1] += p.amax(0)
    return out


@FAST
@given(Hkv=st.integers(1, 2), G=st.sampled_from([1, 3, 4]), L=st.integers(1, 80),
       D=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_column_scores(Hkv, G, L, D, dtype, seed):
    """Torch reference and the Triton two-pass kernel against the float64 formula: every
    query's probabilities sum to 1, so the columns sum to L per KV head (up to the group max)."""
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(Hkv * G, L, D, generator=gen)).to(dtype).to(DEV)
    k = torch.randn(Hkv, L, D, generator=gen).to(dtype).to(DEV)
    want = columns64(q, k)
    kinds = ["torch"] + (["triton"] if HAS_TRITON else [])
    for kind in kinds:
        got = kernels.column_scores(q, k, kernel=kind).cpu().double()
        tol = 2e-5 if dtype == torch.float32 and kind == "torch" else 2e-3
        assert got.shape == (Hkv, L) and torch.allclose(got, want, atol=tol * L, rtol=tol), kind
    if G == 1:  # one head per group: every query's row sums to 1
        assert torch.allclose(want.sum(1), torch.full((Hkv,), float(L), dtype=torch.float64))


@needs_triton
def test_column_scores_tiles_and_strides():
    """Lengths around the tile sizes, query tiles shorter or longer than key tiles, and a strided
    view of q give the same columns."""
    for L in (31, 32, 33, 64, 65):
        gen = torch.Generator().manual_seed(L)
        qb = torch.randn(4, L, 64, generator=gen).to(DEV)
        q, k = qb[:, :, :32], torch.randn(2, L, 32, generator=gen).to(DEV)  # q: non-contiguous
        want = columns64(q, k).float().to(DEV)
        close(kernels.column_scores(q, k, kernel="triton"), want, 1e-5)
        for a, b in (((16, 32, 4), (32, 16, 4)), ((32, 16, 4), (16, 32, 4))):  # (block_q, block_k, warps)
            close(kernels.column_scores_triton(q, k, rows=a, columns=b), want, 1e-5)


def test_column_scores_validation():
    q, k = torch.randn(4, 10, 16), torch.randn(2, 10, 16)
    for bad in ((q[0], k), (q, k[:, :9]), (q[:3], k), (q, k.double())):
        with pytest.raises(ValueError):
            kernels.column_scores(*bad)
    with pytest.raises(ValueError):
        kernels.column_scores(q, k, kernel="nope")


def test_bench_attention_bad_out_dir(tmp_path):
    """An --out directory that cannot be made: one line on stderr, exit 2."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, "bench_attention.py", "--cpu", "--out", str(blocker / "x")],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--out" in r.stderr


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
def test_count(kernel):
    """count gains (calls, dense calls, entries attended, positions 0..pos), the last two summed
    over KV heads, call after call; one call counts once however many programs it launches."""
    q, k, v, pos, idx = make(2, 4, 150, 32, torch.float32, 9, n=60, empty=7)
    count = torch.zeros(4, dtype=torch.int64, device=DEV)
    decode_attention(q, k, v, pos, idx, kernel=kernel, count=count)
    assert count.tolist() == [1, 0, 2 * (60 - 7 + 1), 2 * 150]
    decode_attention(q, k, v, pos, None, scores=True, kernel=kernel, count=count)
    assert count.tolist() == [2, 1, 2 * (60 - 7 + 1) + 2 * 150, 4 * 150]
    with pytest.raises(ValueError):
        decode_attention(q, k, v, pos, idx, kernel=kernel, count=count.int())


# ----------------------------------------------------------------------------- refresh selection

def check_selection(probs, n_kv, pool, k, last, idx, val):
    """A valid answer: distinct positions <= last, each with its pooled score, the same scores as
    the torch reference's (ties may pick other positions), -1/-inf in the slots left over."""
    ridx, rval = kernels.pooled_top_torch(probs.cpu(), n_kv, pool, k, None if last is None else last.cpu())
    idx, val = idx.cpu(), val.cpu()
    assert torch.equal(val.sort(1).values, rval.sort(1).values)
    assert torch.equal((idx < 0), (val == float("-inf")))
    s = torch.nn.functional.max_pool1d(probs.cpu().view(n_kv, -1, probs.shape[1]).amax(1)[None], pool, 1, pool // 2)[0]
    for row in range(n_kv):
        got = idx[row][idx[row] >= 0]
        assert got.unique().numel() == got.numel() and (last is None or (got <= last.cpu()).all())
        assert torch.equal(s[row, got], val[row][idx[row] >= 0])


@FAST
@given(n_kv=st.integers(1, 3), G=st.sampled_from([1, 4]), N=st.integers(1, 700), pool=st.sampled_from([1, 3, 7]),
       kfrac=st.floats(0.01, 1.3), lastfrac=st.one_of(st.none(), st.floats(0, 1)),
       ties=st.sampled_from(["none", "equal", "low bits"]), seed=st.integers(0, 2**16))
@example(n_kv=2, G=4, N=600, pool=7, kfrac=0.2, lastfrac=0.9, ties="low bits", seed=0)  # programs share t's bucket
@example(n_kv=2, G=4, N=600, pool=7, kfrac=0.3, lastfrac=None, ties="low bits", seed=2)
def test_pooled_top(n_kv, G, N, pool, kfrac, lastfrac, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(n_kv * G, N, generator=gen)
    if ties == "equal":  # few distinct values: the threshold falls inside a run of equal scores
        probs = (probs * 4).floor() / 4
    if ties == "low bits":  # few distinct top 24 bits: the last radix pass decides, within one bucket
        top = torch.tensor([0.125, 0.25, 0.5]).view(torch.int32)[torch.randint(0, 3, probs.shape, generator=gen)]
        probs = (top + torch.randint(0, 256, probs.shape, generator=gen, dtype=torch.int32)).view(torch.float32)
    k = max(1, int(kfrac * N))
    last = None if lastfrac is None else torch.tensor([int(lastfrac * (N - 1))])
    if last is not None:
        probs[:, int(last) + 1:] = 0.0                               # as a full step's probs
    probs, last = probs.to(DEV), None if last is None else last.to(DEV)
    for kind in ["torch"] + (["triton"] if HAS_TRITON else []):
        idx, val = kernels.pooled_top(probs, n_kv, pool, k, last, kernel=kind)
        check_selection(probs, n_kv, pool, k, last, idx, val)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
def test_pooled_top_flag(kernel):
    """flag 0: the outputs keep their contents; flag 1: written in place."""
    probs = torch.rand(8, 300, device=DEV)
    out = (torch.full((2, 20), 7, dtype=torch.long, device=DEV), torch.full((2, 20), 0.5, device=DEV))
    flag = torch.zeros(1, dtype=torch.int32, device=DEV)
    kernels.pooled_top(probs, 2, 7, 20, out=out, flag=flag, kernel=kernel)
    assert (out[0] == 7).all() and (out[1] == 0.5).all()
    flag.fill_(1)
    kernels.pooled_top(probs, 2, 7, 20, out=out, flag=flag, kernel=kernel)
    check_selection(probs, 2, 7, 20, None, *out)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
def test_join(kernel):
    """In each row the first slot of the lowest rank (empty slots, -inf, first) takes pos with rank
    1 + pos; under a flag that holds nonzero nothing changes. Rows longer than the kernel's block."""
    gen = torch.Generator().manual_seed(0)
    for K in (1, 7, 300, 5000):
        rank = (torch.rand(3, K, generator=gen) * 4).floor()  # few distinct ranks: ties
        rank[1, torch.randint(0, K, (2,), generator=gen)] = float("-inf")
        idx = torch.randint(0, 9000, (3, K), generator=gen)
        pos = torch.tensor([9000])
        want_idx, want_rank = idx.clone(), rank.clone()
        for r in range(3):
            s = int((rank[r] == rank[r].min()).nonzero()[0])
            want_idx[r, s], want_rank[r, s] = 9000, 9001.0
        for flag, want in ((None, (want_idx, want_rank)), (1, (idx, rank)), (0, (want_idx, want_rank))):
            got = idx.clone().to(DEV), rank.clone().to(DEV)
            f = None if flag is None else torch.tensor([flag], dtype=torch.int32, device=DEV)
            kernels.join(*got, pos.to(DEV), f, kernel=kernel)
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), (K, flag)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_flag(kernel, dtype):
    """A flag on the device picks the pass: nonzero gives idx=None's out and probs bit for bit,
    zero gives idx's out bit for bit (torch) or to rounding (Triton: dense launch layout) and
    leaves probs unwritten; the counts follow the pass taken."""
    q, k, v, pos, idx = make(2, 4, 200, 32, dtype, 21, n=50, empty=5)
    dense, pdense = decode_attention(q, k, v, pos, None, scores=True, kernel=kernel)
    sparse, _ = decode_attention(q, k, v, pos, idx, kernel=kernel)
    for flag in (1, 0):
        full = torch.tensor([flag], device=DEV)
        count = torch.zeros(4, dtype=torch.int64, device=DEV)
        out, p = decode_attention(q, k, v, pos, idx, scores=True, kernel=kernel, count=count, full=full)
        assert p.shape == pdense.shape
        if flag:
            assert torch.equal(out, dense) and torch.equal(p, pdense)
            assert count.tolist() == [1, 1, 2 * 200, 2 * 200]
        else:
            close(out, sparse, 0.0 if kernel == "torch" else TOL[dtype])
            assert count.tolist() == [1, 0, 2 * (50 - 5 + 1), 2 * 200]
    with pytest.raises(ValueError):
        decode_attention(q, k, v, pos, None, full=torch.tensor([1], device=DEV))


@needs_triton
def test_full_flag_launches_do_not_depend_on_flag(monkeypatch):
    """The flag is read in the kernels: the same launches whatever it holds."""
    split, combine = Spy(kernels._split_kernel), Spy(kernels._combine_kernel)
    monkeypatch.setattr(kernels, "_split_kernel", split)
    monkeypatch.setattr(kernels, "_combine_kernel", combine)
    q, k, v, pos, idx = make(2, 4, 150, 32, torch.float32, 22, n=40)
    seen = []
    for flag in (0, 1):
        split.launches, combine.launches = [], []
        decode_attention(q, k, v, pos, idx, scores=True, kernel="triton", full=torch.tensor([flag], device=DEV))
        seen.append((split.launches, combine.launches))
    assert seen[0] == seen[1]


# ----------------------------------------------------------------------------- decode step: fused small ops

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear(dtype):
    """kernels.linear against linear_torch (the ops it replaces) for each prologue and epilogue, N and K
    not multiples of the blocks, by relative error over the output. bf16: the interpreter rounds by
    truncation where torch rounds to nearest (its error is ~1e-2, a GPU's ~1e-3); leaving out the norm,
    silu or the residual costs far more (the last check)."""
    gen = torch.Generator().manual_seed(6)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEV)
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    for N, K in ((37, 300), (70, 96), (20, 2500)):  # the last: several K tiles on a GPU too, one partial
        w, x, gu, g, r = rnd(N, K) / K ** 0.5, rnd(1, 1, K), rnd(2 * K), rnd(K), rnd(1, 1, N)
        for xin, kw in ((x, {}), (x, dict(norm=g)), (x, dict(residual=r)), (gu, dict(silu=True, residual=r))):
            y = kernels.linear(xin, w, **kw)
            want = kernels.linear_torch(xin, w, **kw)
            assert y.shape == (N,) and y.dtype == dtype and torch.isfinite(y).all()
            assert rel(y, want) < tol, (N, K, list(kw), rel(y, want))
            for drop in kw:  # each fused op matters: without it the result is far off
                less = {k: v for k, v in kw.items() if k != drop}
                assert rel(kernels.linear_torch(gu[:K] if drop == "silu" else xin, w, **less), want) > 10 * tol


@needs_triton
def test_linear_rejects_what_it_cannot_do():
    """A transposed weight, an x of the wrong length, or norm with silu: one clear error, not wrong numbers."""
    w, x = torch.randn(8, 16, device=DEV), torch.randn(16, device=DEV)
    for args, kw in (((x, torch.randn(16, 8, device=DEV).t()), {}), ((x[:15], w), {}), ((torch.randn(32, device=DEV), w), dict(silu=True, norm=x))):
        with pytest.raises(ValueError, match="linear wants"):
            kernels.linear(*args, **kw)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_write(dtype):
    """Rotary embedding with the cache write against model.py's PyTorch ops (bf16: one ulp, the
    interpreter truncates)."""
    import model
    gen = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEV)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    H, Hkv, D, N = 4, 2, 32, 20
    qkv, pos = rnd((H + 2 * Hkv) * D), torch.tensor([7], device=DEV)
    freqs = torch.outer(pos.float(), model.rope_frequencies(model.ModelArgs(dim=H * D, n_heads=H)).to(DEV))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    ck, cv = rnd(Hkv, N, D), rnd(Hkv, N, D)
    want_k, want_v = ck.clone(), cv.clone()
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D])
    rot = model.apply_rope(torch.cat([q.view(H, D), k.view(Hkv, D)])[None, :, None], cos, sin)[0, :, 0]
    want_k[:, 7], want_v[:, 7] = rot[H:], v.view(Hkv, D)
    got = kernels.rope_cache_write(qkv, cos[0], sin[0], ck, cv, pos, H)
    close(got, rot[:H], tol)
    close(ck, want_k, tol)
    assert torch.equal(cv, want_v)


@needs_triton
def test_model_decode_step_fused(monkeypatch):
    """model.py's fused decode branch (taken on CUDA) gives the logits and caches of its PyTorch one."""
    import model
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                          hidden_dim=96, max_seq_len=32)).to(DEV)
    tokens = torch.randint(0, 50, (1, 12), device=DEV)
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(model, "fused_step", lambda x, pos: fused and pos is not None and x.shape[1] == 1)
        m.setup_cache(32)
        with torch.no_grad():
            m(tokens[:, :10], start_pos=0)
            logits = [m(tokens[:, i:i + 1], start_pos=torch.tensor([i], device=DEV)) for i in (10, 11)]
        runs.append((torch.cat(logits), m.layers[1].attention.cache_k[:, :12].clone(),
                     m.layers[1].attention.cache_v[:, :12].clone()))
    for a, b in zip(*runs):
        close(a, b, 1e-5)


# ----------------------------------------------------------------------------- h2o's step, the similarity check

@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
def test_h2o_update(kernel):
    """Against the policy's former PyTorch ops, bit for bit: scores added (the group's max), the
    lowest non-recent slot (empty slots first, the first of equal ones) takes pos and its group max;
    every slot recent: slot 0. Scores on a grid of quarters, so that equal ones happen; a slot
    exactly `recent` back (not recent) beside a lighter one a position later (recent); equal lowest
    scores in two of the kernel's blocks; empty slots while every position is recent (pos < recent)."""
    gen = torch.Generator().manual_seed(4)
    for K, G, recent, p in ((1, 1, 0, 20000), (9, 4, 3, 20000), (300, 2, 100, 20000), (5000, 4, 2500, 20000),
                            (6, 1, 20001, 20000), (4, 2, 20, 5)):
        kept = torch.stack([torch.randperm(p, generator=gen)[:K] for _ in range(2)])
        kept[0, K // 2:] = p - (K - K // 2) + torch.arange(K - K // 2)  # recent positions, the last p - 1
        acc = torch.randint(0, 4, (2, K), generator=gen).float()
        probs = torch.randint(0, 5, (2 * G, K + 1), generator=gen) / 4
        if K >= 2 and 0 < recent <= p:  # the boundary: p - recent is not recent, p - recent + 1 is
            kept[0, :2], acc[0, :2] = torch.tensor([p - recent, p - recent + 1]), torch.tensor([-10.0, -20.0])
        if K > 4096 + 3:  # equal lowest scores at 3 and 3 + 4096, in two blocks: the first wins
            kept[1, [3, 4099]], acc[1, [3, 4099]] = torch.tensor([10, 11]), -5.0
            probs[G:, 4099] = probs[G:, 3]
        else:
            kept[1, torch.randint(0, K, (2,), generator=gen)] = -1  # empty slots
        acc[kept < 0] = float("-inf")
        want = kept.clone(), acc.clone()
        got = probs.view(2, G, K + 1).amax(1)
        want[1].add_(got[:, :-1])
        near = (want[0] > p - recent) & (want[0] >= 0)
        slot = want[1].masked_fill(near, float("inf")).argmin(1)
        for r in range(2):
            want[0][r, slot[r]], want[1][r, slot[r]] = p, got[r, -1]
        have = kept.to(DEV), acc.to(DEV)
        kernels.h2o_update(probs.to(DEV), *have, torch.tensor([p], device=DEV), recent, kernel=kernel)
        assert torch.equal(have[0].cpu(), want[0]) and torch.equal(have[1].cpu(), want[1]), (K, G, recent)
        if K > 4096 + 3:
            assert want[0][1, 3] == p
        elif K >= 2 and 0 < recent <= p:
            assert want[0][0, 0] == p


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
def test_h2o_update_chunks(kernel):
    """A row split over programs (K = 4100: chunks of any power of two from 256 to 4096, the last
    one short): the lowest at a chunk's first slot (2048) with a lighter recent one beside it;
    equal lowest at 1023, 1024 and 4099 (the first wins); the lowest in the last chunk's last
    slot; every slot recent but one empty slot in the last chunk."""
    K, G, recent, p = 4100, 2, 1000, 50000
    gen = torch.Generator().manual_seed(11)
    kept = torch.stack([torch.randperm(p - recent, generator=gen)[:K] for _ in range(4)])
    acc = torch.rand(4, K, generator=gen) + 1
    probs = torch.rand(4 * G, K + 1, generator=gen)
    kept[0, [2047, 2048]], acc[0, [2047, 2048]] = torch.tensor([p - 1, 7]), torch.tensor([-2.0, -1.0])
    kept[1, [1023, 1024, 4099]], acc[1, [1023, 1024, 4099]], probs[2:4, [1023, 1024, 4099]] = 5, -1.0, 0.5
    acc[2, 4099] = -1.0
    kept[3] = p - 1 - torch.arange(K) % (recent - 1)  # p - 1 .. p - recent + 1
    kept[3, 4097], acc[3, 4097] = -1, float("-inf")
    want = kept.clone(), acc.clone()
    kernels.h2o_update_torch(probs, *want, torch.tensor([p]), recent)
    assert (want[0] == p).long().argmax(1).tolist() == [2048, 1023, 4099, 4097]
    have = kept.to(DEV), acc.to(DEV)
    kernels.h2o_update(probs.to(DEV), *have, torch.tensor([p], device=DEV), recent, kernel=kernel)
    assert torch.equal(have[0].cpu(), want[0]) and torch.equal(have[1].cpu(), want[1])


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_similarity_check(kernel, dtype):
    """flag 1 exactly where cos(mean query, q_mean) < threshold (F.cosine_similarity), and there
    q_mean becomes the mean query; elsewhere q_mean keeps its bits. Cosines far from the threshold."""
    gen = torch.Generator().manual_seed(5)
    for H, D in ((1, 16), (32, 128), (6, 24)):
        for _ in range(6):
            q = torch.randn(H, D, generator=gen).to(dtype)
            m = q.float().mean(0)
            q_mean = m + 0.8 * m.norm() / D ** 0.5 * torch.randn(D, generator=gen) * torch.rand(1, generator=gen)
            cos = float(torch.nn.functional.cosine_similarity(m, q_mean, dim=0))
            threshold = cos + (0.01 if torch.rand(1, generator=gen) < 0.5 else -0.01)
            have = q_mean.clone().to(DEV)
            flag = kernels.similarity_check(q.to(DEV), have, threshold, kernel=kernel)
            assert flag.dtype == torch.int64 and flag.shape == (1,) and int(flag) == (cos < threshold)
            if cos < threshold:
                torch.testing.assert_close(have.cpu(), m, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(have.cpu(), q_mean)
    # a zero mean query saved (norms clamped as torch clamps them): cosine 0, below 0.5
    q, zero = torch.randn(4, 16, generator=gen).to(dtype), torch.zeros(16, device=DEV)
    assert int(kernels.similarity_check(q.to(DEV), zero, 0.5, kernel=kernel)) == 1
    torch.testing.assert_close(zero.cpu(), q.float().mean(0), rtol=1e-6, atol=1e-6)
