"""End-to-end decoding benchmark per policy: Llama-3.1-8B shapes, random weights, batch 1, greedy.

GPU:  PYTHONUNBUFFERED=1 python bench.py --out $OUT      (one H100 80GB, stops within --time-budget s)
CPU:  python bench.py --cpu                               (tiny model, to check that it runs)
Policies: --policies NAME[:knob=value,...],... from policies.POLICIES; results go to --out (out/).

Each (length, policy) is one refreshkv.generate() call on a prompt of random token ids:
  prefill s   from the call to the first token (cache setup, prompt forward, the policy's prefill)
  ms/step     mean host time between decoded tokens (greedy sampling syncs once per step), over
              the steps after WARMUP; every step counts except the first of each plan, which runs
              as is and is then captured in a CUDA graph (the note counts them)
  graph       share of the timed steps replayed from a CUDA graph (all but steps whose plan is None,
              e.g. refresh-only's similarity checks, which read a value on the host)
  no-graph ms mean host time inside the model's forward, over the timed steps run without a graph
              (--eager: all); close to ms/step means the step waits on the CPU
  capture ms  mean time of the steps that ran a plan for the first time and captured its graph
  floor ms    (weight bytes + the K/V bytes the policy read) / copy bandwidth measured in this run
  bookkeep    the steps after the timed ones run with the attention kernel swapped for a stub (right
              shapes, reads nothing): (stub ms/step of the policy - stub ms/step of full) / ms/step
--peer adds Hugging Face transformers' LlamaForCausalLM on the same shapes (tools/peer_hf.py; SDPA,
a Python loop of forward calls, at most 64 new tokens) after our model's weights are freed.
"""
import argparse
import gc
import json
import os
import time
import traceback

import torch

import policies
from model import ModelArgs, Transformer
from refreshkv import generate

DEFAULT_POLICIES = "full,refreshkv,refreshkv:stride=5,threshold=0.85,snapkv,streamingllm,h2o,tova,quest"

p = argparse.ArgumentParser()
p.add_argument("--cpu", action="store_true", help="tiny model on the CPU")
p.add_argument("--lengths", help="prompt lengths, e.g. 8K,32K,64K,128K (CPU: 512,2048)")
p.add_argument("--new-tokens", type=int, help="tokens generated per run (GPU 256, CPU 64)")
p.add_argument("--budget", default="0.125", help="K as a fraction of the prompt or tokens")
p.add_argument("--policies", default=DEFAULT_POLICIES,
               help="NAME[:knob=value,...],... from policies.POLICIES (default: %(default)s)")
p.add_argument("--layers", type=int, help="decoder layers (GPU 32, CPU 4)")
p.add_argument("--time-budget", type=float, default=480, help="seconds; runs that would not fit are skipped")
p.add_argument("--eager", action="store_true", help="no CUDA graphs: every step issued from Python")
p.add_argument("--peer", action="store_true",
               help="add Hugging Face transformers' LlamaForCausalLM at each length (tools/peer_hf.py; GPU)")
p.add_argument("--out", default="out", help="directory for bench_e2e.md and .json (default: out/)")
args = p.parse_args()

T_START = time.perf_counter()
DEV = "cpu" if args.cpu else "cuda"
DTYPE = torch.float32 if args.cpu else torch.bfloat16
LENGTHS = [int(x[:-1]) * 1024 if x[-1] in "kK" else int(x)
           for x in (args.lengths or ("512,2048" if args.cpu else "8K,32K,64K,128K")).split(",")]
NEW = args.new_tokens or (64 if args.cpu else 256)
WARMUP = 2 if args.cpu else 10  # decode steps left out of the timing (on GPU: past the first refresh)
try:
    SPECS = {policies.label(name, knobs): (name, knobs) for name, knobs in policies.parse_specs(args.policies)}
except ValueError as e:
    p.error(f"--policies: {e}")
NAMES = list(SPECS)  # labels, e.g. "refreshkv:stride=5,threshold=0.85"
if NEW < WARMUP + 4:
    p.error(f"need --new-tokens >= {WARMUP + 4}")
if args.cpu:
    torch.set_num_threads(1)  # steadier timings on a shared machine
REAL_KERNEL, STUB_CALLS, STUB_PROBS = policies.decode_attention, [0], {}


def make(name, L):
    """The policy of a --policies entry, with --budget unless the entry gives its own."""
    kind, knobs = SPECS[name]
    if "budget" in policies.knobs(policies.POLICIES[kind]):
        knobs = {"budget": policies.convert(kind, "budget", args.budget), **knobs}  # a spec's own budget wins
    return policies.build(kind, knobs, L)


for _name in NAMES:  # bad knobs or budgets stop here, before anything runs
    try:
        make(_name, min(LENGTHS))
    except ValueError as e:
        p.error(f"{_name}: {e}")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def build():
    """Random weights made in place on the device (meta first, so nothing is built twice)."""
    if args.cpu:
        margs = ModelArgs(dim=256, n_layers=args.layers or 4, n_heads=8, n_kv_heads=2, vocab_size=258,
                          hidden_dim=768, max_seq_len=max(LENGTHS) + NEW)
    else:
        margs = ModelArgs(n_layers=args.layers or 32, max_seq_len=max(LENGTHS) + NEW, rope_scaling=dict(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
    with torch.device("meta"):
        model = Transformer(margs).to(DTYPE)
    model = model.to_empty(device=DEV).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for w in model.parameters():
            w.fill_(1.0) if w.dim() == 1 else w.normal_(0.0, 0.02)  # norms 1, matrices small, never zeros
    return model


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy, best of 5 batches of 10."""
    x = torch.randn((1 << 28) if DEV == "cuda" else (1 << 24), device=DEV)
    y, best = torch.empty_like(x), float("inf")
    y.copy_(x)
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(10):
            y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes * 10 / best


def stub(q, k, v, pos, idx=None, scores=False, kernel="auto", count=None, full=None):
    """Stands in for decode_attention when timing the bookkeeping: right shapes, no cache reads
    (nor counts: the real kernel counts inside its own launch). Its probabilities are made once per
    shape, by the eager step that precedes each capture, so no launch of the stub's own is timed."""
    STUB_CALLS[0] += 1
    n = k.shape[1] if idx is None or full is not None else idx.shape[1] + 1
    if scores and (q.shape[0], n) not in STUB_PROBS:
        STUB_PROBS[q.shape[0], n] = torch.full((q.shape[0], n), 1.0 / n, device=q.device)
    return q.clone(), (STUB_PROBS[q.shape[0], n] if scores else None)


def free(model, layers):
    for b in layers:
        b.attention.cache_k = b.attention.cache_v = None
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def mean_ms(ts):
    return 1e3 * sum(ts) / len(ts)


def run(model, prompt, name):
    """One generate() call: prefill, timed real steps, then stub steps. Returns the row's numbers."""
    pol = make(name, len(prompt))
    n_dec = NEW - 1  # the first token comes from the prefill
    real = max(1, (n_dec - WARMUP) // 2)
    real = real // 10 * 10 if real >= 10 else real  # whole strides: the fixed schedule's share exactly
    marks, stops, snap, plans = [], [], {}, []
    plan = pol.plan
    pol.plan = lambda t: plans.append(plan(t)) or plans[-1]  # plans[j] is the plan of steps[j]
    hooks = [model.register_forward_pre_hook(lambda *a: marks.append((len(stops), time.perf_counter()))),
             model.register_forward_hook(lambda *a: marks.append((len(stops), time.perf_counter())))]
    graphs = False if args.eager or DEV != "cuda" else {}
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    gc.disable()  # no collector pauses inside the timed steps
    STUB_CALLS[0] = 0
    try:
        sync()
        t0 = time.perf_counter()
        for i, _ in enumerate(generate(model, prompt, pol, NEW, graphs=graphs)):
            sync()
            stops.append(time.perf_counter())
            if i in (WARMUP, WARMUP + real):  # counters around the timed steps
                snap[i] = pol.stats()
            if i == WARMUP + real:
                policies.decode_attention = stub
                if graphs:
                    graphs.clear()  # captured again, with the stub
    finally:
        policies.decode_attention = REAL_KERNEL
        STUB_PROBS.clear()
        gc.enable()
        for h in hooks:
            h.remove()
    steps = [b - a for a, b in zip(stops, stops[1:])]  # steps[j] made token j + 1
    # A step that captured its plan's graph (the first of the plan since generate or the stub swap).
    cut, captured = WARMUP + real, [False] * len(steps)
    for lo, hi in ((0, cut), (cut, len(steps))):
        seen = set()
        for j in range(lo, hi):
            captured[j] = graphs is not False and plans[j] is not None and plans[j] not in seen
            seen.add(plans[j])
    timed = [t for j, t in enumerate(steps[WARMUP:cut], WARMUP) if not captured[j]]
    stub_steps = [t for j, t in enumerate(steps[cut:], cut) if not captured[j]]
    a, b = snap[WARMUP], snap[cut]
    d = {key: b[key] - a[key] for key in a}
    # forward calls made while token j + 1 was being computed, for the timed steps: steps run without a graph
    calls = {}
    for (j, t_pre), (_, t_post) in zip(marks[2::2], marks[3::2]):
        calls.setdefault(j, []).append(t_post - t_pre)
    eager = [sum(calls[j + 1]) for j in range(WARMUP, cut) if j + 1 in calls and not captured[j]]
    capture = [t for j, t in enumerate(steps) if captured[j]]
    return dict(prefill_s=stops[0] - t0, ms=mean_ms(timed), captures=real - len(timed), graph=1 - len(eager) / len(timed),
                capture_ms=mean_ms(capture) if capture else None,
                host_ms=mean_ms(eager) if eager else None,
                stub_ms=mean_ms(stub_steps) if stub_steps and STUB_CALLS[0] else None,
                full_frac=d["full"] / d["steps"], read=d["read"] / d["steps"], timed_steps=len(timed),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None)


FIT = {}  # length -> layers that fitted after an out-of-memory


def run_fitting(model, all_layers, prompt, name):
    """run(), halving the layers on out-of-memory (the row says how many it used)."""
    n = FIT.get(len(prompt), len(all_layers))
    while True:
        model.layers = all_layers[:n]
        oom = False
        try:
            return dict(run(model, prompt, name), layers=n)
        except torch.cuda.OutOfMemoryError:
            oom = True
        except Exception as e:  # a broken policy costs its row, not the whole run
            traceback.print_exc()
            return dict(note=f"error: {type(e).__name__}: {e}"[:100])
        finally:
            model.layers = all_layers
            free(model, all_layers)
        if oom and n == 1:
            return dict(layers=0, note="out of memory with one layer")
        n = FIT[len(prompt)] = n // 2
        print(f"  out of memory: retrying with {n} layers", flush=True)


def floor_ms(model, layers, read, bw):
    """Weights (all but the embedding, of which one row is read) + K/V of `read` positions per layer."""
    a = model.layers[0].attention
    w = sum(t.nbytes for b in model.layers[:layers] for t in b.parameters())
    w += model.output.weight.nbytes + model.norm.weight.nbytes
    kv = read * layers * 2 * a.n_kv_heads * a.head_dim * model.output.weight.element_size()
    return 1e3 * (w + kv) / bw


def predict(base, h2o, L, name, model, bw):
    """Seconds a run should take: prefill and steps from the last measured length, grown by L^2 and L."""
    if not base:
        return 0.0
    L0 = L if L in base else max(base)
    pre, step_ms = base[L0][0] * (L / L0) ** 2, base[L0][1] * L / L0
    if SPECS[name][0] == "h2o":  # the prompt's column sums: grown by L^2 from a measured h2o row, else as much
        pre += h2o[1] * (L / h2o[0]) ** 2 if h2o else pre  # again as the prefill (two passes over causal tiles)
    return 1.2 * pre + 1.5 * NEW * step_ms / 1e3 + 2


def table(rows):
    head = ["length", "policy", "layers", "prefill s", "ms/step", "tok/s", "vs full", "graph", "no-graph ms", "capture ms",
            "full-step frac", "read/layer-step", "floor ms", "bookkeep", "peak GiB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda x, fmt: "—" if x is None else format(x, fmt)
    for r in rows:
        lines.append("| " + " | ".join([f"{r['length'] // 1024}K" if r["length"] >= 1024 else str(r["length"]),
            r["policy"], str(r.get("layers", "—")), f(r.get("prefill_s"), ".2f"), f(r.get("ms"), ".2f"),
            f(r.get("ms") and 1e3 / r["ms"], ".1f"), f(r.get("speedup"), ".2f"), f(r.get("graph"), ".0%"),
            f(r.get("host_ms"), ".2f"), f(r.get("capture_ms"), ".1f"),
            f(r.get("full_frac"), ".3f"), f(r.get("read"), ".0f"), f(r.get("floor_ms"), ".2f"),
            f(r.get("bookkeep"), ".1%"), f(r.get("peak_gib"), ".1f"), r.get("note", "")]) + " |")
    return "\n".join(lines)


def report(rows, model, bw):
    """Speed-up and bookkeeping share against full at the same length and layers; write md + json."""
    for r in rows:
        ref = next((f for f in rows if f["length"] == r["length"] and f["policy"] == "full" and "ms" in f), None)
        if "ms" in r and ref and ref["layers"] == r["layers"]:
            r["speedup"] = ref["ms"] / r["ms"]
            if r["stub_ms"] is not None and ref["stub_ms"] is not None and r["policy"] != "full":
                r["bookkeep"] = (r["stub_ms"] - ref["stub_ms"]) / r["ms"]
    text = table(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_e2e.md"), "w") as fh:
        fh.write(text + "\n")
    meta = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
                copy_bw=bw, args=vars(args), new_tokens=NEW, warmup=WARMUP, model=vars(model.args),
                wall_s=time.perf_counter() - T_START)
    with open(os.path.join(args.out, "bench_e2e.json"), "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1, default=str)
    return text


def peer_rows(model, all_layers):
    """transformers' LlamaForCausalLM (SDPA, a Python loop of forward calls) on the same shapes,
    after our model's weights are freed; at most 64 new tokens per length."""
    try:
        from tools import peer_hf
    except ImportError as e:
        return [dict(length=L, policy="transformers (peer)", note=f"not run: {e}"[:80]) for L in LENGTHS]
    model.to("meta")  # our weights leave the GPU (model.args stays for the report)
    free(model, all_layers)
    rows, new = [], min(NEW, 64)
    try:
        peer = peer_hf.build(len(all_layers), max(LENGTHS) + new)
    except ImportError:
        return [dict(length=L, policy="transformers (peer)", note="not run: transformers not installed") for L in LENGTHS]
    for L in LENGTHS:
        row = dict(length=L, policy="transformers (peer)", layers=len(all_layers))
        left = args.time_budget - (time.perf_counter() - T_START)
        if left < 2 * L / 1024 * 0.1 + new * 0.1 + 5:  # ~0.1 s per 1K of prefill, ~0.1 s per step
            row["note"] = f"skipped: {left:.0f} s left"
        else:
            prefill, ms = peer_hf.run(peer, L, new)
            row.update(prefill_s=prefill, ms=ms, stub_ms=None, note=f"{new} new tokens, {peer_hf.WARMUP} warm-up")
        rows.append(row)
        print(f"{L:>7} peer {row}", flush=True)
        torch.cuda.empty_cache()
    return rows


def main():
    model = build()
    all_layers = model.layers
    bw = copy_bandwidth()
    print(f"{DEV}: {len(all_layers)} layers, dim {model.args.dim}, copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"new tokens {NEW}, budget {args.budget}", flush=True)
    gen = torch.Generator().manual_seed(0)
    if DEV == "cuda":  # compile every Triton variant before anything is timed
        warm = torch.randint(0, model.args.vocab_size, (2048,), generator=gen).tolist()
        for name in NAMES:
            try:
                for _ in generate(model, warm, make(name, 2048), 24):
                    pass
            except Exception:
                traceback.print_exc()
        free(model, all_layers)
        print(f"warm-up done at {time.perf_counter() - T_START:.0f} s", flush=True)
    # Every policy but h2o at every length first; h2o's O(L^2) prefill takes what time is left.
    h2o_runs = [n for n in NAMES if SPECS[n][0] == "h2o"]
    order = [(L, n) for L in LENGTHS for n in NAMES if n not in h2o_runs] + [(L, n) for L in LENGTHS for n in h2o_runs]
    prompts = {L: torch.randint(0, model.args.vocab_size, (L,), generator=gen).tolist() for L in LENGTHS}
    rows, base, h2o = [], {}, None
    for L, name in order:
        need, left = predict(base, h2o, L, name, model, bw), args.time_budget - (time.perf_counter() - T_START)
        row = dict(length=L, policy=name)
        if need > left:
            row["note"] = f"skipped: needs ~{need:.0f} s, {left:.0f} s left"
        else:
            row.update(run_fitting(model, all_layers, prompts[L], name))
        if "ms" in row:
            row["floor_ms"] = floor_ms(model, row["layers"], row["read"], bw)
            if row["layers"] < len(all_layers):
                row["note"] = f"fewer layers ({row['layers']}): did not fit"
            if name not in h2o_runs and L not in base:
                base[L] = (row["prefill_s"], row["ms"])
            if name in h2o_runs and base.get(L):
                h2o = (L, max(0.0, row["prefill_s"] - base[L][0]))
            if row["captures"]:
                row["note"] = (row.get("note", "") + f" {row['captures']} capture step(s) left out").strip()
        rows.append(row)
        print(f"{L:>7} {name:<14} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in row.items() if k not in ("length", "policy")), flush=True)
        report(rows, model, bw)  # after every row, so a killed run still leaves its numbers
    if args.peer and DEV == "cuda":
        rows += peer_rows(model, all_layers)
    print("\n" + report(rows, model, bw), flush=True)
    print(f"wrote {args.out}/bench_e2e.md and .json, {time.perf_counter() - T_START:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
