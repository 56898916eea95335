"""The peer row of bench.py: Hugging Face transformers' LlamaForCausalLM decoding the same shapes.

transformers is not a dependency of the project; run where it is installed (the GPU machine has it):
    PYTHONUNBUFFERED=1 python tools/peer_hf.py --lengths 8K,128K --out DIR
Llama-3.1-8B shapes (32 layers unless --layers), random bf16 weights made on the device, batch 1,
greedy: prefill with logits_to_keep=1, then one forward per token from a Python loop with a
DynamicCache (SDPA attention): what `generate` does, without its extras. Prints one markdown row
per length (prefill s, ms/step over the steps after 10 warm-up steps) and writes peer_hf.md.
"""
import argparse
import os
import sys
import time

import torch

WARMUP = 10


def build(layers, max_len):
    """Llama-3.1-8B's config with random weights, built directly on the GPU in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max_len,
                      rms_norm_eps=1e-5, rope_theta=500000.0, attn_implementation="sdpa",
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model


@torch.no_grad()
def run(model, length, new_tokens):
    """(prefill seconds, ms per decode step) for one random prompt of `length` tokens."""
    from transformers import DynamicCache
    ids = torch.randint(0, 128000, (1, length), device="cuda")
    cache = DynamicCache()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    tok = logits[:, -1].argmax(-1, keepdim=True)
    tok.item()                                    # the first token is on the host: prefill done
    prefill = time.perf_counter() - t0
    times = []
    for _ in range(new_tokens):
        t = time.perf_counter()
        logits = model(tok, past_key_values=cache, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        tok.item()                                # greedy sampling syncs once per step, as ours does
        times.append(time.perf_counter() - t)
    steps = times[WARMUP:]
    return prefill, 1e3 * sum(steps) / len(steps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="8K,128K")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    try:
        lengths = [int(x[:-1]) * 1024 if x[-1] in "kK" else int(x) for x in a.lengths.split(",")]
    except (ValueError, IndexError):
        p.exit(2, f"peer_hf.py: --lengths wants numbers like 8K,131072, got {a.lengths!r}\n")
    if a.new_tokens <= WARMUP or a.layers < 1 or min(lengths) < 1:
        p.exit(2, f"peer_hf.py: need --new-tokens > {WARMUP}, --layers >= 1 and lengths >= 1\n")
    if not torch.cuda.is_available():
        p.exit(2, "peer_hf.py: needs a GPU\n")
    try:
        import transformers
    except ImportError:
        p.exit(2, "peer_hf.py: needs transformers (pip install transformers)\n")
    os.makedirs(a.out, exist_ok=True)
    model = build(a.layers, max(lengths) + a.new_tokens)
    rows = [f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
            f"{a.layers} layers, {a.new_tokens} new tokens ({WARMUP} warm-up)", "",
            "| length | peer | prefill s | ms/step |", "|---|---|---:|---:|"]
    for n in lengths:
        prefill, ms = run(model, n, a.new_tokens)
        rows.append(f"| {n // 1024}K | transformers LlamaForCausalLM (SDPA, eager loop) | {prefill:.2f} | {ms:.2f} |")
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "peer_hf.md"), "w") as f:
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
