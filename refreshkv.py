"""Generate a continuation of a prompt file with a KV-cache policy.

    python refreshkv.py --prompt examples/chain_of_key.txt --policy refreshkv --budget 0.125 --stride 10
"""
import argparse
import codecs
import os
import sys
import time
from pathlib import Path

import torch

from kernels import decode_attention
from model import CheckpointError, load
import policies
from policies import POLICIES, Policy

BUNDLED_MODEL = Path(__file__).parent / "models" / "refreshkv-tiny"
GENERATION_FLAGS = {"prompt", "model", "policy", "max_new_tokens", "temperature", "top_p", "seed", "device",
                    "dtype", "kernel"}  # a policy knob with one of these names gets --<policy>-<knob>


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
    model.setup_cache(len(prompt) + max_new_tokens)
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


def make_policy(args, prompt_len):
    """The policy --policy names, with the knob flags given on the command line."""
    knobs = {}
    for flag, owners in knob_flags().items():
        text = getattr(args, flag)
        if text is None:
            continue
        if args.policy not in owners:
            raise ValueError(f"policy {args.policy} takes no --{flag.replace('_', '-')}")
        knobs[owners[args.policy]] = policies.convert(args.policy, owners[args.policy], text)
    return policies.build(args.policy, knobs, prompt_len)


def stats_line(policy, prompt_len, n_gen, prefill_s, decode_s):
    line = (f"prompt {prompt_len} tokens | generated {n_gen} | prefill {prefill_s:.2f} s | "
            f"decode {(n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0:.1f} tokens/s")
    c = policy.stats()
    if c["steps"]:
        line += (f" | full steps {c['full'] / c['steps']:.1%} of layer-steps | "
                 f"{c['attended'] / c['steps']:.0f} positions attended per layer-step | "
                 f"attention reads saved {1 - c['read'] / c['dense']:.1%}")
    for key, value in c.items():  # a policy's own counters, after the common ones
        if key not in ("steps", "full", "attended", "read", "dense"):
            line += f" | {key.replace('_', ' ')} {value:g}" if isinstance(value, (int, float)) else f" | {key} {value}"
    return line


def fail(message):
    """Bad input: one line on stderr and exit status 2, never a traceback."""
    print(f"refreshkv: error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def parse_args(argv):
    p = Parser(description="Generate with a long prompt and a KV-cache policy (RefreshKV and baselines).")
    p.add_argument("--prompt", required=True, help="UTF-8 text file with the prompt")
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="Llama-3.x checkpoint dir (Hugging Face layout)")
    p.add_argument("--policy", default="full", choices=list(POLICIES))
    add_knob_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"], help="decode attention kernel")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        p.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must lie in (0, 1], got {args.top_p}")
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


def main(argv=None):
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        text = read_prompt(args.prompt)
        if not Path(args.model).is_dir():
            raise ValueError(f"no model directory at {args.model} (pass --model DIR)")
        model, tokenizer = load(args.model, device, dtype)
        prompt = tokenizer.encode(text, bos=True)
        if len(prompt) + args.max_new_tokens > model.args.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max-new-tokens ({args.max_new_tokens}) exceeds "
                             f"the model's context of {model.args.max_seq_len} tokens")
        policy = make_policy(args, len(prompt))
    except (ValueError, CheckpointError) as e:
        fail(e)
    policy.kernel = args.kernel
    stop = set(model.args.eos_ids) | tokenizer.eos_ids
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    start, n = time.perf_counter(), 0
    for n, (token, _) in enumerate(generate(model, prompt, policy, args.max_new_tokens, args.temperature,
                                            args.top_p, args.seed, stop), 1):
        if n == 1:
            prefill_s, start = time.perf_counter() - start, time.perf_counter()
        if token not in stop:
            sys.stdout.write(utf8.decode(tokenizer.decode_bytes([token])))
            sys.stdout.flush()
    sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    print(stats_line(policy, len(prompt), n, prefill_s, time.perf_counter() - start),
          file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
