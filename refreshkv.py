"""Generate a continuation of a prompt file with a KV-cache policy, or compare several.

    python refreshkv.py --prompt examples/chain_of_key.txt --policy refreshkv --budget 0.125 --stride 10
    python refreshkv.py --prompt examples/chain_of_key.txt --compare full,refreshkv:stride=5,snapkv --plot out/cache.png
"""
import argparse
import codecs
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels import decode_attention
from model import CheckpointError, load
import policies
from policies import POLICIES, Policy

BUNDLED_MODEL = Path(__file__).parent / "models" / "refreshkv-tiny"
# A policy knob with one of these names gets the flag --<policy>-<knob>.
GENERATION_FLAGS = {"prompt", "model", "policy", "compare", "max_new_tokens", "temperature", "top_p", "seed", "device",
                    "dtype", "kernel", "threads", "chat", "system", "plot", "plot_layer", "plot_head"}
MIN_TEMPERATURE = 1e-3  # sampling colder than this is greedy anyway; far colder overflows


def sample(logits, temperature, top_p, gen):
    """Greedy at temperature 0; otherwise nucleus sampling from the smallest set of mass >= top_p."""
    if temperature == 0:
        return int(logits.argmax())
    probs, ids = (logits / temperature).softmax(-1).sort(descending=True)
    probs[probs.cumsum(-1) - probs > top_p] = 0
    return int(ids[torch.multinomial(probs, 1, generator=gen)])


@torch.inference_mode()
def generate(model, prompt, policy=None, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, stop=(), graphs=None,
             forced=None):
    """Yield (token, logits [vocab]) for each generated token. The first token comes from the
    prefill's logits; each later one from a decode step of the policy. forced: tokens to feed back
    instead of sampling (teacher forcing: eval.py scores a gold answer so).
    On CUDA each decode step runs as a CUDA graph: the first step of each plan (policy.plan) runs
    as is and is then captured; later steps of that plan replay it, with the token and its
    position in fixed buffers. graphs: the captured graphs by plan (a fresh dict by default);
    False runs every step without them (to compare). The first step of a plan runs attend's Python
    code twice (run, then captured), so a policy keeps its counts on the device, not in Python."""
    device = model.tok_embeddings.weight.device
    policy = policy or Policy()
    model.setup_cache(len(prompt) + max_new_tokens - 1)  # the last token is never fed back
    gen = torch.Generator(device).manual_seed(seed)
    first = policy if len(prompt) > 1 else PrefillOne(policy)
    logits = model(torch.tensor([prompt], device=device), start_pos=0, policy=first)[0, -1]
    token_now = torch.zeros(1, 1, dtype=torch.long, device=device)  # the decode step's input...
    pos_now = torch.zeros(1, dtype=torch.long, device=device)  # ...and its position
    step = lambda: model(token_now, pos_now, policy)[0, -1]
    if graphs is None:
        graphs = {} if device.type == "cuda" else False
    if graphs:
        raise ValueError("graphs must start empty: a graph holds the buffers of one generation")
    for t in range(1, max_new_tokens + 1):
        token = forced[t - 1] if forced is not None else sample(logits, temperature, top_p, gen)
        yield token, logits
        if token in stop or t == max_new_tokens:
            return
        token_now.fill_(token)
        pos_now.fill_(len(prompt) + t - 1)
        plan = policy.plan(t + 1)
        if graphs is not False and plan in graphs:
            graph, out = graphs[plan]
            graph.replay()
            logits = out.clone()  # out is overwritten by the next replay
            continue
        logits = step()
        if graphs is not False and plan is not None:
            graphs[plan] = capture(step)


class PrefillOne:
    """A one-token prompt reaches the attention as a decode step (the model prefills prompts of
    more than one token): there this prefills the policy and attends to the token itself."""

    def __init__(self, policy):
        self.policy = policy

    def attend(self, layer, q, k, v, pos, q_raw):
        self.policy.prefill(layer, q[:, None], k, q_raw[:, None])
        return decode_attention(q, k, v, pos, kernel=self.policy.kernel)[0]


def capture(step):
    """Record step() in a CUDA graph (nothing runs) -> (graph, its output tensor)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def knob_flags():
    """Each knob flag -> {policy: knob}, from the registered constructors: --<knob>, shared by the
    policies that take it, or --<policy>-<knob> for a knob named like a generation flag (seed)."""
    flags = {}
    for name, cls in POLICIES.items():
        for knob in policies.knobs(cls):
            flag = f"{name}_{knob}" if knob in GENERATION_FLAGS else knob
            flags.setdefault(flag, {})[name] = knob
    return flags


def add_knob_flags(p):
    for flag, owners in knob_flags().items():
        params = {name: policies.knobs(POLICIES[name])[knob] for name, knob in owners.items()}
        if flag == "budget":
            text = "K: tokens (256) or a fraction of the prompt (0.125, the default)"
        else:
            text = ", ".join(f"{name} (default {params[name].default})" for name in owners)
        switch = all(q.annotation is bool for q in params.values())  # --refresh-only, or --refresh-only false
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, help=text,
                       **(dict(nargs="?", const="true", metavar="BOOL") if switch else {}))


def flag_knobs(args, name):
    """The knob flags given on the command line that policy `name` takes -> {knob: value}."""
    knobs = {}
    for flag, owners in knob_flags().items():
        if getattr(args, flag) is not None and name in owners:
            knobs[owners[name]] = policies.convert(name, owners[name], getattr(args, flag))
    return knobs


def check_flags(args, names):
    """Each knob flag given must belong to one of the policies run."""
    for flag, owners in knob_flags().items():
        if getattr(args, flag) is not None and not set(owners) & set(names):
            raise ValueError(f"policy {' or '.join(names)} takes no --{flag.replace('_', '-')}")


def check_knobs(name, knobs, context):
    """What the constructors cannot know: the model's context, and a threshold that never fires."""
    budget, threshold = knobs.get("budget"), knobs.get("threshold")
    if isinstance(budget, int) and budget > context:
        raise ValueError(f"{name}'s budget of {budget} tokens is more than the model's context of {context} tokens")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"{name}'s threshold is a cosine similarity in (0, 1] (the paper uses 0.85), got {threshold}")


def builds(name, knobs, prompt_len):
    try:
        return policies.build(name, knobs, prompt_len)
    except ValueError:
        return None


def make_policy(name, knobs, prompt_len, context):
    """The policy `name` with these knobs (the others at their defaults). A budget given as a fraction
    of a prompt too short for it is refused with the smallest budget in tokens that works."""
    check_knobs(name, knobs, context)
    try:
        return policies.build(name, knobs, prompt_len)
    except ValueError:
        budget = knobs.get("budget", policies.DEFAULT_BUDGET)
        if not isinstance(budget, float):
            raise
        tokens = policies.budget_tokens(budget, prompt_len)
        works = next((b for b in range(tokens + 1, context + 1) if builds(name, dict(knobs, budget=b), prompt_len)), None)
        if works is None:
            raise
        raise ValueError(f"the prompt ({prompt_len} tokens) is too short for {name} with budget {budget:g}, which "
                         f"gives it {tokens}: give a budget of {works} tokens or more (--budget {works})") from None


def stats_line(policy, prompt_len, n_gen, prefill_s, decode_s):
    line = (f"prompt {prompt_len} tokens | generated {n_gen} | prefill {prefill_s:.2f} s | "
            f"decode {(n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0:.1f} tokens/s")
    c = policy.stats() if n_gen else {"steps": 0}  # the counters exist once the prompt is prefilled
    if c["steps"]:
        line += (f" | full steps {c['full'] / c['steps']:.1%} of layer-steps | "
                 f"{c['attended'] / c['steps']:.0f} positions attended per layer-step | "
                 f"attention reads saved {1 - c['read'] / c['dense']:.1%}")
    for key, value in c.items():  # a policy's own counters, after the common ones
        if key not in ("steps", "full", "attended", "read", "dense"):
            line += f" | {key.replace('_', ' ')} {value:g}" if isinstance(value, (int, float)) else f" | {key} {value}"
    return line


def departure(ref, tokens, tokenizer):
    """Where tokens first differ from ref (full attention's) -> (token number, some text of each), or None."""
    i = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), min(len(ref), len(tokens)))
    if ref[:i] == ref and tokens[:i] == tokens:
        return None
    text = lambda ids: tokenizer.decode_bytes(ids).decode("utf-8", "replace")
    return i + 1, f"after {text(tokens[:i])[-24:]!r} it writes {text(tokens[i:])[:12]!r}, full attention {text(ref[i:])[:12]!r}"


@dataclass
class Run:
    """One policy's generation so far (Ctrl-C or a closed pipe may end it early)."""
    label: str
    policy: object
    tokens: list = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def stats(self, prompt_len):
        return stats_line(self.policy, prompt_len, len(self.tokens), self.prefill_s, self.decode_s)


class Stdout:
    """The continuation's way out. A reader that goes away (a broken pipe: `| head`) ends generation
    quietly, so that the stats still reach stderr; any other write error (a full disk) is fatal."""

    def __init__(self):
        self.gone = False

    def write(self, text):
        """-> False once the reader has gone."""
        try:
            if not self.gone:
                sys.stdout.write(text)
                sys.stdout.flush()
        except OSError as e:
            self.gone = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush is quiet
            if not isinstance(e, BrokenPipeError):
                fail(f"cannot write to stdout: {e.strerror or e}")
        return not self.gone


def stream(run, model, prompt, stop, args, out, tokenizer, graphs=None):
    """Generate with run.policy, writing the text as it comes; fills run (tokens, timings) as it goes."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    start = time.perf_counter()
    for token, _ in generate(model, prompt, run.policy, args.max_new_tokens, args.temperature, args.top_p,
                             args.seed, stop, graphs):
        now = time.perf_counter()
        if not run.tokens:
            run.prefill_s, start = now - start, now
        run.tokens.append(token)
        run.decode_s = now - start
        if token not in stop and not out.write(utf8.decode(tokenizer.decode_bytes([token]))):
            return
    out.write(utf8.decode(b"", final=True))


def fail(message):
    """Bad input: one line on stderr and exit status 2, never a traceback."""
    print(f"refreshkv: error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)" only where there is one
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_args(argv):
    p = Parser(description="Generate with a long prompt and a KV-cache policy (RefreshKV and baselines), or "
                           "compare policies on one prompt.", formatter_class=Help,
               epilog="example: python refreshkv.py --prompt examples/chain_of_key.txt "
                      "--compare full,refreshkv:stride=5,snapkv --plot out/cache.png")
    p.add_argument("--prompt", required=True, help="UTF-8 text file with the prompt")
    p.add_argument("--model", help="Llama-3.x checkpoint dir, Hugging Face layout (default: the bundled model)")
    p.add_argument("--policy", choices=list(POLICIES), help="the KV-cache policy (default: full)")
    p.add_argument("--compare", metavar="SPECS", help="run each policy on the prompt, after full attention, and show "
                   "where each departs from it: name[:knob=value,...],name2,... (knob flags apply to all that take them)")
    add_knob_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="at most this many tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass")
    p.add_argument("--seed", type=int, default=0, help="sampling: random seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Llama-3 Instruct format (Instruct checkpoints)")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message")
    p.add_argument("--plot", metavar="FILE.png", help="draw what full attention and each policy's selection hold, by step")
    p.add_argument("--plot-layer", type=int, help="--plot's layer (default: the middle one)")
    p.add_argument("--plot-head", type=int, default=0, help="--plot's KV head")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"], help="decode attention kernel")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 holds up best on a busy 2-core machine; "
                   "more are faster only on idle cores)")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        p.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf):
        p.error(f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2 ** 64:
        p.error(f"--seed must lie in [0, 2**64), got {args.seed}")
    if args.threads < 1:
        p.error(f"--threads must be positive, got {args.threads}")
    if args.policy and args.compare:
        p.error("--compare runs the policies it names: leave out --policy")
    if args.system is not None and not args.chat:
        p.error("--system goes with --chat")
    if args.plot and (Path(args.plot).suffix.lower() != ".png" or not Path(args.plot).parent.is_dir()):
        p.error(f"--plot wants a .png file in an existing directory, got {args.plot}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA GPU is available")
    if args.kernel == "triton" and (args.device == "cpu" or not torch.cuda.is_available()) \
            and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--kernel triton needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    return args


def read_prompt(path):
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read prompt file {path}: {e.strerror}") from None
    if not text.strip():
        raise ValueError(f"prompt file {path} is empty")
    return text


def prepare(args):
    """Read and check everything before generating -> (text, model, tokenizer, prompt, runs)."""
    text = read_prompt(args.prompt)
    args.model = args.model or str(BUNDLED_MODEL)
    if not Path(args.model).is_dir():
        raise ValueError(f"no model directory at {args.model} (pass --model DIR)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tokenizer = load(args.model, device, dtype)
    prompt = tokenizer.encode_chat(text, args.system) if args.chat else tokenizer.encode(text, bos=True)
    context = model.args.max_seq_len  # config.json's max_position_embeddings: what the model was trained for
    if len(prompt) + args.max_new_tokens - 1 > context:  # the last new token is never fed back
        raise ValueError(f"prompt ({len(prompt)} tokens) + max-new-tokens ({args.max_new_tokens}) exceeds the model's "
                         f"context of {context} tokens")
    specs = policies.parse_specs(args.compare) if args.compare else [(args.policy or "full", {})]
    if args.compare and ("full", {}) not in specs:
        specs.insert(0, ("full", {}))  # the reference
    specs.sort(key=lambda spec: spec != ("full", {}))  # the reference first
    check_flags(args, [name for name, _ in specs])
    runs = []
    for name, knobs in specs:
        knobs = {**flag_knobs(args, name), **knobs}
        policy = make_policy(name, knobs, len(prompt), context)
        policy.kernel = args.kernel
        runs.append(Run(policies.label(name, knobs), policy))
    if args.plot:
        args.plot_layer = model.args.n_layers // 2 if args.plot_layer is None else args.plot_layer
        if not 0 <= args.plot_layer < model.args.n_layers or not 0 <= args.plot_head < model.args.n_kv_heads:
            raise ValueError(f"--plot-layer must lie in [0, {model.args.n_layers}) and --plot-head in "
                             f"[0, {model.args.n_kv_heads}) for this model")
    return text, model, tokenizer, prompt, runs


def report(runs, prompt_len, tokenizer, compare):
    """On stderr: the stats line, or in compare mode one row per policy and where it departs from full attention."""
    width = max(len(r.label) for r in runs)
    for r in runs:
        where = departure(runs[0].tokens, r.tokens, tokenizer) if r is not runs[0] else None
        row = r.stats(prompt_len) + (f" | departs at token {where[0]}" if where else "")
        print(f"{r.label:<{width}}  {row}" if compare else row, file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    if sys.stdout is None:
        fail("stdout is closed")
    torch.set_num_threads(args.threads)
    try:
        text, model, tokenizer, prompt, runs = prepare(args)
    except (ValueError, CheckpointError) as e:
        fail(e)
    if args.plot:
        import plot  # only here: matplotlib costs nothing to runs without --plot
        recorders = [plot.record(r.policy, args.plot_layer, args.plot_head) for r in runs]
    stop = set(model.args.eos_ids) | tokenizer.eos_ids
    out, started = Stdout(), 0
    try:
        for r in runs:
            started += 1
            if args.compare:
                out.write(f"== {r.label} ==\n")
            stream(r, model, prompt, stop, args, out, tokenizer, graphs=False if args.plot else None)
            out.write("\n")
            where = departure(runs[0].tokens, r.tokens, tokenizer)
            if where:
                out.write(f"-- departs from full attention at token {where[0]}: {where[1]}\n")
            if out.gone:
                break
    except KeyboardInterrupt:  # Ctrl-C: a newline, the stats so far, and the shell's status for it
        out.write("\n")
        report(runs[:started], len(prompt), tokenizer, args.compare)
        sys.exit(130)
    report(runs[:started], len(prompt), tokenizer, args.compare)
    if args.plot:
        try:
            plot.draw(args.plot, [(r.label, rec) for r, rec in zip(runs, recorders)],
                      plot.prompt_regions(text, tokenizer, prompt, args.chat), args.plot_layer, args.plot_head,
                      Path(args.prompt).name)
        except (OSError, ValueError) as e:
            fail(f"cannot draw {args.plot}: {e.strerror if isinstance(e, OSError) else e}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before generating: nothing to report
        print(file=sys.stderr)
        sys.exit(130)
