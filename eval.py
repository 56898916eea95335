"""Accuracy of each policy on the long-output tasks of tasks.py, at budgets of 1/8 and 1/4 of the input.

    python eval.py --n 3                          # a small sample on the CPU, a few minutes
    python eval.py --n 40 --workers 12            # a larger one (worker processes share the device)

Prints one table (chain-of-key exact match at hops 1..8, exact match on multi_key and id_range,
attention reads saved versus full) and writes it as CSV.
"""
import argparse
import csv
import multiprocessing as mp
import time

import torch

import tasks
from model import load
from policies import POLICIES
from refreshkv import BUNDLED_MODEL, generate

CONFIGS = [  # (label, policy, knobs). Pool 31 bytes spans about the text that the paper's 7 BPE tokens do.
    ("full", "full", {}),
    ("refreshkv S=5 pool 31", "refreshkv", dict(stride=5, pool=31)),
    ("refreshkv S=10 pool 31", "refreshkv", dict(stride=10, pool=31)),
    ("refreshkv qc S=5 s=.85 pool 31", "refreshkv", dict(stride=5, threshold=0.85, pool=31)),
    ("refreshkv S=10 pool 7", "refreshkv", dict(stride=10)),
    ("snapkv pool 31", "snapkv", dict(pool=31)),
    ("snapkv pool 7", "snapkv", {}),
    ("streamingllm", "streamingllm", {}),
    ("h2o", "h2o", {}),
    ("tova", "tova", {}),
    ("quest", "quest", {}),
    ("oracle", "oracle", {}),
]
HOPS = 8


def examples(n, length):
    """Held-out seeds (training draws its own random ones): n of each task."""
    return ([tasks.chain_of_key(2 * 10**6 + i, length, HOPS) for i in range(n)]
            + [tasks.multi_key(2 * 10**6 + i, length, 6) for i in range(n)]
            + [tasks.id_range(2 * 10**6 + i, length, 6) for i in range(n)])


def run_config(job):
    """One (config, budget fraction) over all examples -> a result row."""
    (label, name, knobs), frac, model_dir, device, n, length = job
    torch.set_num_threads(1)
    model, tok = load(model_dir, device, torch.float32 if device == "cpu" else torch.bfloat16)
    stop = set(model.args.eos_ids) | tok.eos_ids
    chain, exact, read, dense = [], {"multi_key": [], "id_range": []}, 0, 0
    for ex in examples(n, length):
        prompt = tok.encode(ex.prompt, bos=True)
        policy = POLICIES[name](**knobs, **({} if name == "full" else dict(budget=max(1, int(frac * len(prompt))))))
        ids = [t for t, _ in generate(model, prompt, policy, len(tok.encode(ex.answer)) + 4, stop=stop)]
        output = tok.decode([t for t in ids if t not in stop])
        if ex.task == "chain_of_key":
            chain.append(tasks.score(ex, output))
        else:
            exact[ex.task].append(tasks.exact(ex, output))
        c = policy.stats()
        read, dense = read + c["read"], dense + c["dense"]
    return dict(policy=label, budget="-" if name == "full" else f"{frac:g}",
                **{f"hop{h}": a for h, a in enumerate(tasks.hop_accuracy(chain, HOPS), 1)},
                multi_key=sum(exact["multi_key"]) / n, id_range=sum(exact["id_range"]) / n,
                reads_saved=1 - read / dense)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--n", type=int, default=3, help="examples per task")
    p.add_argument("--length", type=int, default=2000, help="input length in bytes (= tokens, byte-level)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--csv", default="eval.csv")
    args = p.parse_args()
    jobs = [(c, f, args.model, args.device, args.n, args.length)
            for c in CONFIGS for f in (args.budgets[:1] if c[1] == "full" else args.budgets)]
    start = time.time()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        rows = pool.map(run_config, jobs, chunksize=1)
    cols = list(rows[0])
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    print(f"{args.n} examples per task, inputs of ~{args.length} tokens, greedy; {time.time() - start:.0f} s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.0%}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
