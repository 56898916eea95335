"""Check model.py against Hugging Face transformers' LlamaForCausalLM on random-weight checkpoints.

transformers is not a dependency of the project; run this in an environment that has it:
    pip install torch==2.13.0 transformers && python tools/compare_hf.py
For each config (GQA ratio 1/2/4, tied and untied embeddings, llama3 rope scaling on and off) it
saves a random checkpoint with model.save, loads it with both, and compares float32 logits on a
prefill and on 20 decode steps of model.py's KV cache. Prints the max abs error of each.
"""
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs, Transformer, load, save  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CONFIGS = [dict(n_heads=4, n_kv_heads=4), dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),
           dict(n_heads=8, n_kv_heads=2, rope_scaling=SCALING), dict(n_heads=8, n_kv_heads=4, rope_scaling=SCALING, tie_embeddings=True),
           dict(n_heads=8, n_kv_heads=8, rope_scaling=SCALING)]


def main():
    torch.manual_seed(0)
    worst = 0.0
    for cfg in CONFIGS:
        args = ModelArgs(dim=128, n_layers=3, vocab_size=258, hidden_dim=256, max_seq_len=512,
                         rope_theta=500000.0, bos_id=256, eos_ids=[257], **cfg)
        model = Transformer(args)
        for p in model.parameters():  # norms too, so a swapped norm weight shows
            torch.nn.init.normal_(p, std=0.3)
        with tempfile.TemporaryDirectory() as d:
            save(model, d, Tokenizer.byte_level())
            ours, _ = load(d)
            hf = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
        tokens = torch.randint(0, 258, (1, 200))
        with torch.no_grad():
            ref = hf(tokens).logits[0]  # [L, V]
            ours.setup_cache(200)
            got = [ours(tokens[:, :180], start_pos=0)[0, -1]]
            got += [ours(tokens[:, i:i + 1], start_pos=i)[0, -1] for i in range(180, 200)]
            prefill_err = (got[0] - ref[179]).abs().max().item()
            decode_err = (torch.stack(got[1:]) - ref[180:]).abs().max().item()
            full_err = (ours(tokens)[0] - ref).abs().max().item()
        worst = max(worst, prefill_err, decode_err, full_err)
        print(f"{cfg}: max |logit diff| prefill {prefill_err:.2e}, 20 decode steps {decode_err:.2e}, "
              f"all 200 positions {full_err:.2e} (logit scale {ref.abs().max():.1f})")
    print(f"worst {worst:.2e}: {'PASS' if worst <= 1e-4 else 'FAIL'} (bound 1e-4)")
    sys.exit(worst > 1e-4)


if __name__ == "__main__":
    main()
