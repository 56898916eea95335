"""Where a replayed decode step's GPU time goes: kernels per step, GPU busy time, the top kernels.

    python tools/profile_step.py --length 131072 --policy refreshkv --stride 10      (one H100)

Llama-3.1-8B shapes with random weights, as bench.py. Profiles --steps replayed steps after a
warm-up and prints one table per run; "busy" is the sum of kernel times, so step - busy is the
time the GPU waits between kernels (launch gaps inside the graph, the host's sync per token).
"""
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs, Transformer  # noqa: E402
import policies  # noqa: E402
from refreshkv import generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=131072)
p.add_argument("--policy", default="refreshkv")
p.add_argument("--stride", type=int)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--top", type=int, default=12)
args = p.parse_args()

margs = ModelArgs(max_seq_len=args.length + 64, rope_scaling=dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
with torch.device("meta"):
    model = Transformer(margs).to(torch.bfloat16)
model = model.to_empty(device="cuda").eval()
torch.manual_seed(0)
with torch.no_grad():
    for w in model.parameters():
        w.fill_(1.0) if w.dim() == 1 else w.normal_(0.0, 0.02)
prompt = torch.randint(0, margs.vocab_size, (args.length,)).tolist()
knobs = {} if args.stride is None else dict(stride=args.stride)
policy = policies.build(args.policy, knobs, args.length)  # budget: the default, L/8
warm, n = 12, args.steps
gen = generate(model, prompt, policy, warm + n + 1)
for _ in range(warm):
    next(gen)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    t = time.perf_counter()
    for _ in range(n):
        next(gen)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
kernels = defaultdict(lambda: [0, 0.0])
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        k = kernels[e.name[:70]]
        k[0] += 1
        k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
busy = sum(v[1] for v in kernels.values()) / n / 1e3
count = sum(v[0] for v in kernels.values()) / n
small = sum(v[1] for v in kernels.values() if v[1] / v[0] < 5.0) / n / 1e3  # kernels under 5 us each
print(f"{args.policy} L={args.length}: step {1e3 * wall:.2f} ms, GPU busy {busy:.2f} ms, {count:.0f} kernels/step, "
      f"kernels under 5 us: {small:.2f} ms/step")
print("| kernel | per step | ms/step | us each |\n|---|---|---|---|")
for name, (c, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]:
    print(f"| {name} | {c / n:.1f} | {us / n / 1e3:.3f} | {us / c:.1f} |")
