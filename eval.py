"""Accuracy of each KV-cache policy on the long-output tasks of tasks.py, with intervals.

    python eval.py --n 100 --workers 12 --out out/eval            # the README table (GPU, minutes)
    python eval.py --n 4 --lengths 400 --policies full,refreshkv  # a quick look on a CPU
    python eval.py --fit --n 10 --workers 14                       # fit the similarity threshold

Each example is scored by teacher forcing: its gold answer is fed back token by token through the
policy's decode steps (refreshkv.generate with forced tokens), and each step's logits give
- exact match: every answer token is the greedy choice, i.e. greedy decoding writes the gold answer
  (for chain_of_key also hop accuracy: how many answer lines come before the first wrong token);
- token accuracy: the share of answer tokens that are the greedy choice;
- the perplexity of the gold answer: exp of the mean negative log-likelihood per answer token.
These do not collapse to 0 at the first wrong token, as exact match does. Exact match by teacher
forcing equals greedy decoding's (--verify N runs both on N examples per cell and counts agreement).
Every rate carries a 95% Wilson interval; each policy's exact match is compared with full
attention's on the same examples by an exact McNemar test (p). Inputs are held-out seeds
(training draws its own random ones; --fit uses yet other seeds). Results: --out/eval.csv and
--out/eval.md, never the repo root.
"""
import csv
import json
import math
import multiprocessing as mp
import time
from pathlib import Path

import torch

import tasks
from model import args_from_config, load
from policies import POLICIES, build, knobs, label, parse_specs
from refreshkv import BUNDLED_MODEL, Parser, generate

# README's table. threshold 0.8: the bundled model's fit (`--fit`, notes/eval/fit_threshold_lookahead_two_lengths.txt)
DEFAULT_POLICIES = "full,refreshkv,refreshkv:stride=1,threshold=0.8,snapkv,streamingllm,h2o,tova,oracle"
ITEMS = {"chain_of_key": 8, "multi_key": 6, "id_range": 8}  # answer lines per task
EVAL_SEED, FIT_SEED = 2 * 10**6, 5 * 10**6  # held-out examples; threshold fitting (never reported)


def examples(task, n, length, seed=EVAL_SEED):
    size = int(length * tasks.BYTES_PER_TOKEN[task])  # lengths are asked for in tokens, tasks.py sizes in bytes
    return [tasks.make_example(task, seed + i, size, ITEMS[task]) for i in range(n)]


_MODELS = {}


def load_config(model_dir):
    return args_from_config(json.loads((Path(model_dir) / "config.json").read_text()))


def score(job):
    """One cell (a policy on n examples of a task) -> per-example results."""
    model_dir, device, spec, frac, task, length, n, seed, verify = job
    torch.set_num_threads(1)
    if model_dir not in _MODELS:
        _MODELS[model_dir] = load(model_dir, device, torch.float32 if device == "cpu" else torch.bfloat16)
    model, tok = _MODELS[model_dir]
    name, knobs = spec
    out = []
    for i, ex in enumerate(examples(task, n, length, seed)):
        prompt, gold = tok.encode(ex.prompt, bos=True), tok.encode(ex.answer)
        policy = build(name, dict(knobs, budget=frac) if frac else knobs, len(prompt))
        logits = torch.stack([lg for _, lg in generate(model, prompt, policy, len(gold), forced=gold)]).float()
        target = torch.tensor(gold, device=logits.device)
        right = (logits.argmax(-1) == target).tolist()
        nll = torch.nn.functional.cross_entropy(logits, target).item()
        first_wrong = right.index(False) if False in right else len(gold)
        c = policy.stats()
        row = dict(exact=first_wrong == len(gold), lines=tasks.score(ex, tok.decode(gold[:first_wrong])),
                   token_acc=sum(right) / len(gold), nll=nll, full_share=c["full"] / max(1, c["steps"]),
                   read=c["read"], dense=c["dense"], tokens=len(prompt))
        if i < verify:  # greedy decoding must write the gold answer exactly when teacher forcing says so
            policy = build(name, dict(knobs, budget=frac) if frac else knobs, len(prompt))
            text = tok.decode([t for t, _ in generate(model, prompt, policy, len(gold))])
            row["agree"] = tasks.exact(ex, text) == row["exact"]
        out.append(row)
    return out


def wilson(k, n, z=1.96):
    """95% interval of a rate k/n."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def mcnemar(a, b):
    """Exact two-sided McNemar p for paired booleans a, b: are the discordant pairs balanced?"""
    x = sum(u and not v for u, v in zip(a, b))
    y = sum(v and not u for u, v in zip(a, b))
    m = x + y
    return 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(min(x, y) + 1)) / 2 ** m)


def mean_ci(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))
    return m, 1.96 * sd / math.sqrt(len(xs))


def summarise(job, rows, full_rows):
    """One table row for a cell."""
    _, _, (name, knobs), frac, task, length, n, _, _ = job
    k = sum(r["exact"] for r in rows)
    lo, hi = wilson(k, n)
    acc, acc_ci = mean_ci([r["token_acc"] for r in rows])
    nll, nll_ci = mean_ci([r["nll"] for r in rows])
    budget = frac or knobs.get("budget")
    row = dict(policy=label(name, knobs), budget="-" if budget is None else f"{budget:g}", task=task,
               tokens=round(sum(r["tokens"] for r in rows) / n), n=n,
               exact=k / n, exact_lo=lo, exact_hi=hi,
               p_vs_full=mcnemar([r["exact"] for r in full_rows], [r["exact"] for r in rows]) if full_rows else "",
               token_acc=acc, token_acc_ci=acc_ci, ppl=math.exp(nll), ppl_lo=math.exp(nll - nll_ci),
               ppl_hi=math.exp(nll + nll_ci), full_share=sum(r["full_share"] for r in rows) / n,
               reads_saved=1 - sum(r["read"] for r in rows) / sum(r["dense"] for r in rows))
    if task == "chain_of_key":
        row["hops"] = " ".join(f"{sum(r['lines'] >= h for r in rows) / n:.0%}" for h in range(1, ITEMS[task] + 1))
    if "agree" in rows[0]:
        checked = [r["agree"] for r in rows if "agree" in r]
        row["greedy_agrees"] = f"{sum(checked)}/{len(checked)}"
    return row


def run(jobs, workers):
    """Each job's per-example results, yielded in the order of jobs as they finish (worker processes
    share the device)."""
    if workers <= 1:
        yield from map(score, jobs)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(score, jobs, chunksize=1)


def markdown(rows):
    """The table people read: exact match with its interval and p against full, token accuracy, perplexity."""
    out = ["| policy | budget | task | tokens | n | exact match [95% CI] | p vs full | token acc | "
           "gold ppl [95% CI] | full steps | reads saved | chain hops 1..8 |", "|" + "---|" * 12]
    for r in rows:
        p = "" if r["p_vs_full"] == "" else f"{r['p_vs_full']:.2g}"
        out.append(f"| {r['policy']} | {r['budget']} | {r['task']} | {r['tokens']} | {r['n']} | "
                   f"{r['exact']:.0%} [{r['exact_lo']:.0%}, {r['exact_hi']:.0%}] | {p} | "
                   f"{r['token_acc']:.1%} ± {r['token_acc_ci']:.1%} | {r['ppl']:.3g} [{r['ppl_lo']:.3g}, {r['ppl_hi']:.3g}] | "
                   f"{r['full_share']:.2f} | {r['reads_saved']:.0%} | {r.get('hops', '')} |")
    return "\n".join(out)


def fit_threshold(args):
    """The similarity schedule checked at every step (stride 1): the smallest threshold (fewest full
    steps) whose token accuracy stays within `--fit-drop` of full attention's at every input length,
    on training-distribution examples (seeds FIT_SEED+), never the eval's. The paper fitted its 0.85
    to Llama-3.1-8B the same way: as few full steps as the accuracy allows."""
    grid = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9]
    specs = [("full", {})] + [("refreshkv", {"stride": 1, "threshold": s}) for s in grid]
    jobs = [(args.model, args.device, spec, None if spec[0] == "full" else args.budgets[0], task,
             length, args.n, FIT_SEED, 0) for spec in specs for length in args.lengths for task in tasks.TASK_NAMES]
    results = list(run(jobs, args.workers))
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    per = {(s, n): [] for s in [None] + grid for n in args.lengths}  # (threshold, length) -> rows
    for j, rs in zip(jobs, results):
        per[j[2][1].get("threshold"), j[5]] += rs
    ok = lambda s, n: mean(per[s, n], "token_acc") >= mean(per[None, n], "token_acc") - args.fit_drop
    best = next((s for s in grid if all(ok(s, n) for n in args.lengths)), None)
    print(f"fit on {args.n} examples per task (seeds {FIT_SEED}+), budget {args.budgets[0]:g}")
    print("| threshold | tokens | full-step share | token acc | exact |\n|---|---|---|---|---|")
    for s in [None] + grid:
        for n in args.lengths:
            print(f"| {s or 'full attention'} | {n} | {mean(per[s, n], 'full_share'):.3f} | "
                  f"{mean(per[s, n], 'token_acc'):.1%} | {mean(per[s, n], 'exact'):.0%} |")
    print(f"fitted threshold: {best} (token accuracy within {args.fit_drop:g} of full attention's at every length)")
    return best


def main():
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="NAME[:knob=value,...],... (default: %(default)s)")
    p.add_argument("--n", type=int, default=100, help="examples per task and cell")
    p.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000], help="input lengths in tokens")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25], help="K as a fraction of the input")
    p.add_argument("--tasks", nargs="+", default=list(tasks.TASK_NAMES), choices=tasks.TASK_NAMES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--verify", type=int, default=0, help="also decode greedily the first N examples of each cell")
    p.add_argument("--fit", action="store_true", help="fit the per-step similarity threshold and stop")
    p.add_argument("--fit-drop", type=float, default=0.005, help="--fit: most token accuracy to lose against full attention")
    p.add_argument("--out", default="out/eval", help="output directory")
    args = p.parse_args()
    try:
        specs = parse_specs(args.policies)
        context = load_config(args.model).max_seq_len
    except (ValueError, OSError) as e:
        p.error(str(e).splitlines()[0])
    if args.n < 1 or args.workers < 1:
        p.error("--n and --workers must be at least 1")
    if max(args.lengths) * 1.1 + 100 > context:  # inputs come within ~10% of the asked length, plus the answer
        p.error(f"--lengths {max(args.lengths)} does not fit the model's context of {context} tokens")
    if not all(0 < b <= 1 for b in args.budgets):
        p.error("--budgets are fractions in (0, 1]")
    start = time.time()
    if args.fit:
        fit_threshold(args)
        return
    swept = lambda spec: "budget" in knobs(POLICIES[spec[0]]) and "budget" not in spec[1]  # takes --budgets
    jobs = [(args.model, args.device, spec, frac if swept(spec) else None, task, length, args.n, EVAL_SEED, args.verify)
            for spec in specs for frac in (args.budgets if swept(spec) else [None])
            for length in args.lengths for task in args.tasks]
    jobs.sort(key=lambda j: j[2][0] != "full")  # full attention first: the others are compared with it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full, rows, checked = {}, [], []
    with open(out / "eval.csv", "w", newline="") as f:  # a row per cell as it finishes (full's first)
        w = None
        for j, rs in zip(jobs, run(jobs, args.workers)):
            if j[2][0] == "full":
                full[j[4], j[5]] = rs
            rows.append(summarise(j, rs, full.get((j[4], j[5])) if j[2][0] != "full" else None))
            checked += [r["agree"] for r in rs if "agree" in r]
            if w is None:
                w = csv.DictWriter(f, list(dict.fromkeys([*rows[-1], "hops", "greedy_agrees"])), restval="")
                w.writeheader()
            w.writerow(rows[-1])
            f.flush()
            print(f"{time.time() - start:6.0f} s  {rows[-1]['policy']} {rows[-1]['budget']} {j[4]} {j[5]}: "
                  f"exact {rows[-1]['exact']:.0%}, token acc {rows[-1]['token_acc']:.1%}", flush=True)
    head = (f"{args.model}: {args.n} held-out examples per task and cell, teacher-forced, "
            f"{time.time() - start:.0f} s")
    if checked:
        head += f"; greedy decoding agreed with teacher-forced exact match on {sum(checked)}/{len(checked)} examples"
    (out / "eval.md").write_text(head + "\n\n" + markdown(rows) + "\n")
    print(head)
    print(markdown(rows))


if __name__ == "__main__":
    main()
