"""A from-scratch Llama-3 decoder that loads Hugging Face-layout checkpoints.

The KV cache keeps every token (the full cache). On a decode step each layer hands its new
query and the cache to a policy (policies.py), which decides what the query attends to:
    policy.prefill(layer, q, k, q_raw)          after the prompt's causal attention
    policy.attend(layer, q, k, v, pos, q_raw)   -> out [H, D]   on each decoded token
k, v are the whole cache buffers [Hkv, max_len, D]; pos [1] the current token's position, a device
tensor; q_raw the query before rotary embedding. With no policy, every step is full attention.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import kernels
from kernels import decode_attention
from tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the problem."""


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    head_dim: int | None = None  # dim // n_heads unless the config says otherwise
    bos_id: int = 128000
    eos_ids: tuple = (128001, 128008, 128009)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self.eos_ids = tuple(self.eos_ids)


def rope_frequencies(args):
    """Inverse frequencies [head_dim/2], rescaled by wavelength band for Llama-3.1's long context."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
    s = args.rope_scaling
    if not s:
        return inv
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    return torch.where((wavelen >= old / hi) & (wavelen <= old / lo), mid, scaled)


def fused_step(x, pos):
    """A decode step (one token, batch 1) on CUDA: each weight product is one Triton launch
    (kernels.linear) with the norm before it, silu * up or the residual add fused in, and rotary
    embedding with the cache write is one more: the same numbers in fewer launches."""
    return pos is not None and x.shape[1] == 1 and x.is_cuda and kernels.triton is not None


def apply_rope(x, cos, sin):
    """Rotary embedding in the 'rotate half' form of Hugging Face checkpoints. x [B, H, L, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalised in float32, as Hugging Face's Llama does
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v projections stacked by rows: one matrix product (checkpoints store them apart)
        self.sizes = [args.n_heads * args.head_dim] + 2 * [args.n_kv_heads * args.head_dim]
        self.wqkv = nn.Linear(args.dim, sum(self.sizes), bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # [Hkv, max_len, D] once setup_cache is called

    def forward(self, x, cos, sin, pos=None, policy=None):
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = k.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_raw = q
        q, k = apply_rope(torch.cat([q, k], 1), cos, sin).split([self.n_heads, self.n_kv_heads], 1)  # one pass
        if pos is None:  # training, no cache: causal attention, or a training-time policy's (train.py)
            y = policy(self.layer_id, q, k, v) if policy is not None else \
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # inference, batch 1: write the new keys and values into the full cache at pos [L]
            self.cache_k.index_copy_(1, pos, k[0])
            self.cache_v.index_copy_(1, pos, v[0])
            if L > 1:  # prefill (from position 0): causal attention over the prompt, then the policy sees it
                y = F.scaled_dot_product_attention(q, self.cache_k[None, :, :L], self.cache_v[None, :, :L],
                                                   is_causal=True, enable_gqa=True)
                if policy is not None:
                    policy.prefill(self.layer_id, q[0], self.cache_k, q_raw[0])
            elif policy is not None:  # decode: the policy chooses what the query attends to
                y = policy.attend(self.layer_id, q[0, :, 0], self.cache_k, self.cache_v, pos, q_raw[0, :, 0])
                y = y[None, :, None]
            else:
                y = decode_attention(q[0, :, 0], self.cache_k, self.cache_v, pos)[0][None, :, None]
        return self.wo(y.transpose(1, 2).reshape(B, L, -1))

    def decode_fused(self, x, norm, cos, sin, pos, policy):
        """x + forward(norm(x)) for one token (x [1, 1, dim]): the norm inside the q/k/v product, rope
        and the cache write in one launch, the residual add inside the output product."""
        qkv = kernels.linear(x, self.wqkv.weight, norm.weight, norm.eps)  # [(H + 2 Hkv) * D]
        q_raw = qkv[:self.sizes[0]].view(self.n_heads, self.head_dim)
        q = kernels.rope_cache_write(qkv, cos.view(-1), sin.view(-1), self.cache_k, self.cache_v, pos, self.n_heads)
        if policy is not None:
            y = policy.attend(self.layer_id, q, self.cache_k, self.cache_v, pos, q_raw)
        else:
            y = decode_attention(q, self.cache_k, self.cache_v, pos)[0]
        return kernels.linear(y, self.wo.weight, residual=x).view_as(x)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)  # gate and up stacked: one product
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    def decode_fused(self, h, norm):
        """h + forward(norm(h)) for one token (h [1, 1, dim]): the norm inside the gate/up product,
        silu * up and the residual add inside the down product."""
        gu = kernels.linear(h, self.w13.weight, norm.weight, norm.eps)  # [2 * hidden]
        return kernels.linear(gu, self.w2.weight, silu=True, residual=h).view_as(h)


class Block(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, pos=None, policy=None):
        if fused_step(x, pos):  # the norms and residual adds inside the weight products
            h = self.attention.decode_fused(x, self.attention_norm, cos, sin, pos, policy)
            return self.feed_forward.decode_fused(h, self.ffn_norm)
        h = x + self.attention(self.attention_norm(x), cos, sin, pos, policy)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.inv_freq = rope_frequencies(args)  # a plain tensor, moved to the input's device on use

    def forward(self, tokens, start_pos=None, policy=None):
        """tokens [B, L] -> logits. Training (start_pos None): [B, L, vocab]; there `policy`, if given,
        is a function (layer, q [B, H, L, D], k, v [B, Hkv, L, D]) -> attention output [B, H, L, D].
        Inference (batch 1, cache set up): the tokens sit at start_pos.. (an int, or a one-element
        tensor on the device, so that a decode step can be captured once in a CUDA graph and
        replayed at every position); a prompt starts at 0. Returns the last one's logits [1, 1, vocab]."""
        B, L = tokens.shape
        if self.inv_freq.device != tokens.device:
            self.inv_freq = self.inv_freq.to(tokens.device)
        if L > 1 and start_pos is not None and not (isinstance(start_pos, int) and start_pos == 0):
            raise ValueError("a prompt (more than one token) must start at position 0")
        pos = torch.arange(L, device=tokens.device) + (0 if start_pos is None else start_pos)  # [L]
        freqs = torch.outer(pos.float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, D]
        h = self.tok_embeddings(tokens)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, None if start_pos is None else pos, policy)
        if start_pos is not None and fused_step(h, pos):  # a decode step: the final norm inside the product
            return kernels.linear(h, self.output.weight, self.norm.weight, self.norm.eps).view(1, 1, -1).float()
        if start_pos is not None:
            h = h[:, -1:]  # only the last position's logits are needed to decode
        return self.output(self.norm(h)).float()

    def setup_cache(self, max_len):
        """Allocate the full KV cache for max_len tokens (prompt + generated)."""
        w = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            a.cache_k = torch.empty(a.n_kv_heads, max_len, a.head_dim, device=w.device, dtype=w.dtype)
            a.cache_v = torch.empty_like(a.cache_k)


# ---- Hugging Face layout: config.json, *.safetensors, tokenizer.model ----

def hf_names(args):
    """Our parameter name -> the Hugging Face LlamaForCausalLM names of the tensors it stacks by
    rows, with their row counts: (name, rows) pairs; rows None is the whole tensor."""
    names = {"tok_embeddings.weight": [("model.embed_tokens.weight", None)], "norm.weight": [("model.norm.weight", None)]}
    if not args.tie_embeddings:
        names["output.weight"] = [("lm_head.weight", None)]
    q, kv, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    parts = {"attention.wqkv": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
             "attention.wo": [("self_attn.o_proj", None)],
             "feed_forward.w13": [("mlp.gate_proj", hidden), ("mlp.up_proj", hidden)],
             "feed_forward.w2": [("mlp.down_proj", None)], "attention_norm": [("input_layernorm", None)],
             "ffn_norm": [("post_attention_layernorm", None)]}
    for i in range(args.n_layers):
        for ours, hf in parts.items():
            names[f"layers.{i}.{ours}.weight"] = [(f"model.layers.{i}.{n}.weight", rows) for n, rows in hf]
    return names


def setting(cfg, key, default=None, kind=int):
    """cfg[key] (default when absent) checked to be a positive int, or with kind=float a positive number."""
    if key not in cfg and default is None:
        raise CheckpointError(f"config.json lacks {key!r}")
    value = cfg.get(key, default)
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not (ok and 0 < value < math.inf):  # also no NaN, which JSON allows
        raise CheckpointError(f"config.json: {key} must be a positive {'number' if kind is float else 'integer'}, "
                              f"got {json.dumps(value)[:40]}")
    return value


def args_from_config(cfg):
    """config.json (parsed) -> ModelArgs; a config of the wrong shape is a CheckpointError that names the field."""
    if not isinstance(cfg, dict):
        raise CheckpointError("config.json is not a JSON object")
    if cfg.get("architectures") != ["LlamaForCausalLM"]:
        raise CheckpointError(f"architecture {str(cfg.get('architectures'))[:60]} is not LlamaForCausalLM")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError("attention or MLP biases are not part of Llama-3")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # newer configs nest rope_theta here
    if not isinstance(rope, dict):
        raise CheckpointError(f"config.json: rope_scaling must be an object or null, got {json.dumps(rope)[:40]}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise CheckpointError(f"rope scaling type {str(kind)[:40]!r} is not supported (only llama3)")
    scaling = None
    if kind == "llama3":
        scaling = {k: setting(rope, k, kind=float) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                            "original_max_position_embeddings")}
    n_heads = setting(cfg, "num_attention_heads")
    n_kv_heads = setting(cfg, "num_key_value_heads", n_heads)
    if n_heads % n_kv_heads:
        raise CheckpointError(f"config.json: {n_heads} attention heads do not split into {n_kv_heads} KV-head groups")
    if not isinstance(cfg.get("tie_word_embeddings", False), bool):
        raise CheckpointError("config.json: tie_word_embeddings must be true or false")
    eos = cfg.get("eos_token_id", 128001)
    eos = eos if isinstance(eos, list) else [eos]
    ids = [cfg.get("bos_token_id", 128000)] + eos
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"config.json: bos_token_id and eos_token_id must be token ids, got {json.dumps(ids)[:40]}")
    return ModelArgs(
        dim=setting(cfg, "hidden_size"), n_layers=setting(cfg, "num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_kv_heads, vocab_size=setting(cfg, "vocab_size"), hidden_dim=setting(cfg, "intermediate_size"),
        norm_eps=setting(cfg, "rms_norm_eps", 1e-5, float),
        rope_theta=setting(rope if "rope_theta" in rope else cfg, "rope_theta", 10000.0, float),
        rope_scaling=scaling, max_seq_len=setting(cfg, "max_position_embeddings", 8192),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        head_dim=setting(cfg, "head_dim") if cfg.get("head_dim") is not None else None,
        bos_id=ids[0], eos_ids=eos)


def config_from_args(args, dtype=torch.float32):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
            "intermediate_size": args.hidden_dim, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "rope_scaling": dict(args.rope_scaling, rope_type="llama3") if args.rope_scaling else None,
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
            "head_dim": args.head_dim, "bos_token_id": args.bos_id, "eos_token_id": list(args.eos_ids),
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).split(".")[-1]}


def safetensors_files(path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            raise CheckpointError(f"{index} is not a valid safetensors index") from None
        files = [path / s for s in shards]
    else:
        files = [path / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"missing weights file {f}")
    return files


def first_line(error):
    """An exception as a short message (some libraries put a whole file's bytes into theirs)."""
    return (str(error).splitlines() or [type(error).__name__])[0][:120]


def load_tokenizer(path, vocab_size):
    for f in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
        if f.is_file():
            try:
                return Tokenizer.from_file(f, vocab_size)
            except Exception as e:
                raise CheckpointError(f"cannot read tokenizer {f}: {first_line(e)}") from None
    raise CheckpointError(f"no tokenizer.model in {path} or {path / 'original'}")


def load(path, device="cpu", dtype=torch.float32):
    """Load a Llama-3.x checkpoint directory -> (model, tokenizer). Each tensor is read once,
    straight onto `device`, and cast; the model is built on the meta device so no second copy exists."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no config.json in {path}")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON") from None
    args = args_from_config(cfg)
    with torch.device("meta"):
        model = Transformer(args)
    ours_shapes = {k: v.shape for k, v in model.state_dict().items()}
    names = hf_names(args)
    shapes = {}  # Hugging Face name -> shape, from ours (stacked ones split by rows)
    for ours, parts in names.items():
        shape = ours_shapes[ours]
        shapes.update({hf: shape if rows is None else torch.Size((rows, *shape[1:])) for hf, rows in parts})
    tensors = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue  # some checkpoints store rope frequencies; we compute them
                    if key == "lm_head.weight" and args.tie_embeddings:
                        continue  # tied: the output layer is the embedding (as in transformers)
                    if key not in shapes:
                        raise CheckpointError(f"unexpected tensor {key} in {file.name}")
                    t = f.get_tensor(key)
                    if t.shape != shapes[key]:
                        raise CheckpointError(f"tensor {key} has shape {tuple(t.shape)}, config says "
                                              f"{tuple(shapes[key])}")
                    tensors[key] = t.to(dtype)
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or corrupt file
            raise CheckpointError(f"cannot read {file}: {first_line(e)}") from None
    missing = [hf for hf in shapes if hf not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
    state = {}
    for ours, parts in names.items():  # q/k/v and gate/up stacked, one layer at a time
        state[ours] = torch.cat([tensors.pop(hf) for hf, _ in parts]) if len(parts) > 1 else tensors.pop(parts[0][0])
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval(), load_tokenizer(path, args.vocab_size)


def save(model, path, tokenizer, shard_bytes=None):
    """Write model and tokenizer in the layout load() reads (and Hugging Face's LlamaForCausalLM too);
    with shard_bytes, as model-0000N-of-0000M.safetensors shards of at most that size plus an index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_from_args(model.args, model.norm.weight.dtype), indent=2))
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for ours, parts in hf_names(model.args).items():  # stacked ones split back by rows
        pieces = params[ours].detach().split([rows or params[ours].shape[0] for _, rows in parts])
        tensors.update({hf: t.contiguous() for (hf, _), t in zip(parts, pieces)})
    shards, size = [[]], 0
    for name, t in tensors.items():
        if shard_bytes and shards[-1] and size + t.nbytes > shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += t.nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, str(path / file), metadata={"format": "pt"})
    if len(shards) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {n: f for f, names in zip(files, shards) for n in names}}, indent=2))
    tokenizer.save(path / "tokenizer.model")
