"""How far a fixed stride could go: RefreshKV whose full steps see what the next steps will need.

    python tools/foresight.py --n 20 --stride 10 --budget 0.125 --length 2000   # ~15 min on a 2-core CPU

A fixed stride's partial steps attend only to what the last full step selected, and a full step
selects what its own query attends to now. Here each example (training-distribution seeds, not
eval.py's) is teacher-forced three times: under full attention, recording every decode step's
scores in every layer; under RefreshKV as it is; and under Foresight, a RefreshKV whose full step
selects the top-K of the max of its own scores and the recorded full-attention scores of the next
stride-1 steps: what a full step would keep if its query already looked where those steps will.
If Foresight matches full attention, what the stride lacks is the query's foresight, which
training can teach (train.py --lookahead); if not, no training rescues that stride and budget.
--layers gives the foresight to some layers only (the others refresh as RefreshKV does): which
layer's query is the one that does not look ahead?
Results go to --out (foresight.md), with eval.py's 95% intervals.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tasks  # noqa: E402
from eval import FIT_SEED, examples, wilson  # noqa: E402
from model import load  # noqa: E402
from policies import Policy, RefreshKV, budget_tokens  # noqa: E402
from refreshkv import BUNDLED_MODEL, Parser, generate  # noqa: E402


class Recorder(Policy):
    """Full attention that keeps each decode step's scores [H, N], by (step t, layer)."""

    full_steps = True

    def __init__(self):
        self.scores, self.t = {}, 1

    def plan(self, t):
        self.t = t
        return None  # no CUDA graph: a replay would skip attend's Python, which records

    def attend(self, layer, q, k, v, pos, q_raw):
        out, probs = self.run(q, k, v, pos, None, scores=True)
        self.scores[self.t, layer] = probs.float().clone()
        return out


class Foresight(RefreshKV):
    """RefreshKV whose refresh at step t (the prefill: t = 1) ranks positions by the max of its own
    scores and the recorded scores of steps t+1 .. t+stride-1, the partial steps it serves; only in
    `layers` (None: every layer), the others refresh as RefreshKV does."""

    def __init__(self, budget, stride, scores, layers=None):
        super().__init__(budget, stride)
        self.future, self.t, self.layers = scores, 1, layers

    def plan(self, t):
        self.t = t
        super().plan(t)
        return None  # no CUDA graph: the refresh reads self.t in Python

    def ahead(self):
        """The steps the refresh at step t serves: the partial ones before the next full step
        (decode steps start at t = 2)."""
        return range(max(2, self.t + 1), (self.t // self.stride + 1) * self.stride)

    def refresh(self, layer, probs, q_raw, last=None, flag=None):
        if self.layers is None or layer in self.layers:
            for u in (u for u in self.ahead() if (u, layer) in self.future):  # none past the answer's end
                future = self.future[u, layer][:, :probs.shape[1]]
                if last is not None:  # tokens after this one join the small cache anyway
                    future = future.masked_fill(torch.arange(future.shape[1], device=future.device) > last, 0)
                probs = torch.maximum(probs, future)
        super().refresh(layer, probs, q_raw, last, flag)


def teacher_forced(model, prompt, gold, policy):
    """The greedy choices' agreement with the gold answer: (exact, right tokens)."""
    logits = torch.stack([lg for _, lg in generate(model, prompt, policy, len(gold), forced=gold)])
    right = int((logits.argmax(-1) == torch.tensor(gold, device=logits.device)).sum())
    return right == len(gold), right


def main():
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--n", type=int, default=20, help="examples per task")
    p.add_argument("--stride", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.125, help="K as a fraction of the input")
    p.add_argument("--length", type=int, default=2000, help="input length in tokens")
    p.add_argument("--layers", help="comma-separated layers whose full steps see ahead (default: every layer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="out/foresight")
    args = p.parse_args()
    if args.n < 1 or args.stride < 1 or not 0 < args.budget <= 1:
        p.error("--n and --stride must be at least 1 and --budget a fraction in (0, 1]")
    try:
        layers = None if args.layers is None else {int(x) for x in args.layers.split(",")}
    except ValueError:
        p.error(f"--layers takes comma-separated layer numbers, got {args.layers!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: {e.strerror}")
    try:
        model, tok = load(args.model, args.device, torch.float32 if args.device == "cpu" else torch.bfloat16)
    except (ValueError, OSError) as e:
        p.error(str(e).splitlines()[0])
    if layers is not None and not layers <= set(range(model.args.n_layers)):
        p.error(f"--layers must lie in 0..{model.args.n_layers - 1}")
    if args.length * 1.1 + 100 > model.args.max_seq_len:
        p.error(f"--length {args.length} does not fit the model's context of {model.args.max_seq_len} tokens")
    start = time.time()
    seeing = "every layer" if layers is None else "layers " + ",".join(map(str, sorted(layers)))
    lines = [f"{args.model}: stride {args.stride}, K = {args.budget:g} L, foresight in {seeing}, ~{args.length} tokens, {args.n} examples "
             f"per task (seeds {FIT_SEED}+), teacher-forced", "",
             "| task | policy | exact match [95% CI] | token acc |", "|---|---|---|---|"]
    for task in tasks.TASK_NAMES:
        found = {"full": [0, 0], "refreshkv": [0, 0], "foresight": [0, 0]}
        total = 0
        for ex in examples(task, args.n, args.length, FIT_SEED):
            prompt, gold = tok.encode(ex.prompt, bos=True), tok.encode(ex.answer)
            K, record = budget_tokens(args.budget, len(prompt)), Recorder()
            for name, policy in (("full", record), ("refreshkv", RefreshKV(K, args.stride)),
                                 ("foresight", Foresight(K, args.stride, record.scores, layers))):
                exact, right = teacher_forced(model, prompt, gold, policy)
                found[name][0] += exact
                found[name][1] += right
            total += len(gold)
        for name, (exact, right) in found.items():
            lo, hi = wilson(exact, args.n)
            lines.append(f"| {task} | {name} | {exact / args.n:.0%} [{lo:.0%}, {hi:.0%}] | {right / total:.1%} |")
        print("\n".join(lines[-3:]), flush=True)
    lines[0] += f", {time.time() - start:.0f} s"
    (out / "foresight.md").write_text("\n".join(lines) + "\n")
    print(lines[0])


if __name__ == "__main__":
    main()
