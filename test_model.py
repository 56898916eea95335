"""model.py and tokenizer.py on checkpoints the tests write themselves."""
import base64
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, ModelArgs, Transformer, load, rope_frequencies, save
from tokenizer import Tokenizer

SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, hidden_dim=128,
                               max_seq_len=512, bos_id=256, eos_ids=[257]), **kw})
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.fixture
def ckpt(tmp_path):
    model = tiny(tie_embeddings=False, rope_scaling=SCALING)
    save(model, tmp_path, Tokenizer.byte_level())
    return model, tmp_path


@pytest.mark.parametrize("kw", [dict(n_kv_heads=4), dict(n_kv_heads=2, tie_embeddings=True),
                                dict(n_heads=8, n_kv_heads=2, rope_scaling=SCALING)])
def test_shapes_and_round_trip(tmp_path, kw):
    model = tiny(**kw)
    tokens = torch.randint(0, 258, (2, 33))
    assert model(tokens).shape == (2, 33, 258)
    save(model, tmp_path, Tokenizer.byte_level())
    loaded, tok = load(tmp_path)
    assert loaded.args == model.args
    assert torch.equal(loaded(tokens), model(tokens))
    assert tok.n_words == 258 and tok.bos_id == 256 and tok.eos_ids == {257}
    if model.args.tie_embeddings:
        assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
        assert loaded.output.weight is loaded.tok_embeddings.weight


@torch.no_grad()
def test_prefill_then_decode_equals_one_long_prefill():
    model = tiny(n_heads=8, n_kv_heads=2, rope_scaling=SCALING)
    tokens = torch.randint(0, 258, (1, 60))
    full = model(tokens)[0]
    model.setup_cache(60)
    assert torch.allclose(model(tokens[:, :40], start_pos=0)[0, -1], full[39], atol=1e-5)
    for i in range(40, 60):
        assert torch.allclose(model(tokens[:, i:i + 1], start_pos=i)[0, -1], full[i], atol=1e-5)


@torch.no_grad()
def test_causal_masking():
    model = tiny()
    a = torch.randint(0, 258, (1, 30))
    b = a.clone()
    b[0, 20:] = (b[0, 20:] + 1) % 258
    la, lb = model(a)[0], model(b)[0]
    assert torch.equal(la[:20], lb[:20])
    assert not torch.allclose(la[20:], lb[20:])


def test_rope_frequencies_follow_the_llama3_formula():
    args = ModelArgs(dim=512, n_heads=4, rope_theta=500000.0, rope_scaling=dict(SCALING, original_max_position_embeddings=8192))
    base = ModelArgs(dim=512, n_heads=4, rope_theta=500000.0)
    got, plain = rope_frequencies(args), rope_frequencies(base)
    for f, p in zip(got.tolist(), plain.tolist()):
        wavelen = 2 * math.pi / p
        if wavelen < 8192 / 4:  # high frequencies stay
            want = p
        elif wavelen > 8192 / 1:  # low frequencies slow down by the factor
            want = p / 8
        else:  # in between, a smooth mix
            s = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - s) * p / 8 + s * p
        assert f == pytest.approx(want, rel=1e-5)
    assert (got < plain).any() and (got == plain).any()


def test_load_sharded_and_bfloat16(ckpt, tmp_path_factory):
    model, path = ckpt
    tensors = load_file(path / "model.safetensors")
    shard_dir = tmp_path_factory.mktemp("sharded")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, shard_dir / file)
    (shard_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (shard_dir / "config.json").write_text((path / "config.json").read_text())
    (shard_dir / "original").mkdir()
    (shard_dir / "original" / "tokenizer.model").write_text((path / "tokenizer.model").read_text())
    sharded, _ = load(shard_dir)
    tokens = torch.randint(0, 258, (1, 16))
    assert torch.equal(sharded(tokens), model(tokens))
    save(model, shard_dir / "by_size", Tokenizer.byte_level(), shard_bytes=40_000)  # save's own shards
    assert len(list((shard_dir / "by_size").glob("model-*-of-*.safetensors"))) > 2
    assert torch.equal(load(shard_dir / "by_size")[0](tokens), model(tokens))
    half, _ = load(path, dtype=torch.bfloat16)
    assert half.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.allclose(half(tokens), model(tokens), atol=0.5)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "config.json").unlink(), "no config.json"),
    (lambda p: (p / "model.safetensors").unlink(), "missing weights file"),
    (lambda p: (p / "tokenizer.model").unlink(), "no tokenizer.model"),
    (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda p: edit_config(p, architectures=["MistralForCausalLM"]), "not LlamaForCausalLM"),
    (lambda p: edit_config(p, hidden_size=96), "has shape"),
    (lambda p: edit_config(p, num_hidden_layers=3), "checkpoint lacks"),
    (lambda p: edit_config(p, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "not supported"),
    (lambda p: (p / "model.safetensors").write_bytes(b"garbage"), "cannot read"),
    # valid JSON of the wrong shape
    (lambda p: (p / "config.json").write_text("[1, 2]"), "not a JSON object"),
    (lambda p: edit_config(p, rope_scaling="llama3"), "rope_scaling must be an object"),
    (lambda p: edit_config(p, hidden_size="384"), "hidden_size must be a positive integer"),
    (lambda p: edit_config(p, num_attention_heads=0), "num_attention_heads must be a positive integer"),
    (lambda p: edit_config(p, max_position_embeddings=None), "max_position_embeddings must be a positive integer"),
    (lambda p: edit_config(p, rms_norm_eps=float("nan")), "rms_norm_eps must be a positive number"),
    (lambda p: edit_config(p, num_key_value_heads=3), "do not split into 3"),
    (lambda p: edit_config(p, rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks 'low_freq_factor'"),
    (lambda p: edit_config(p, eos_token_id="257"), "must be token ids"),
    (lambda p: edit_config(p, tie_word_embeddings="yes"), "true or false"),
    # rank files: cut short, garbage, a gap in the ranks
    (lambda p: cut_lines(p / "tokenizer.model", 100), "single bytes are not tokens"),
    (lambda p: (p / "tokenizer.model").write_bytes(bytes(range(256)) * 4), "line 1 is not 'base64-token rank'"),
    (lambda p: cut_lines(p / "tokenizer.model", 200, 201), "255 ranks are not 0..254"),
])
def test_broken_checkpoints_raise_one_clear_error(ckpt, breakage, message):
    _, path = ckpt
    breakage(path)
    with pytest.raises(CheckpointError, match=re.escape(message)) as e:
        load(path)
    assert len(str(e.value)) < 200 + len(str(path)) and "\n" not in str(e.value)


def cut_lines(path, keep, drop=None):
    """Keep the first `keep` lines of a text file, leaving out lines keep..drop-1 when drop is given."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:keep] + (lines[drop:] if drop else [])))


def test_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path):
    model = tiny(tie_embeddings=True)
    save(model, tmp_path, Tokenizer.byte_level())
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # as some exports do
    save_file(tensors, tmp_path / "model.safetensors")
    loaded, _ = load(tmp_path)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, 258, (1, 9))
    assert torch.equal(loaded(tokens), model(tokens))


def test_rank_file_is_read_without_tiktokens_cache(tmp_path, monkeypatch):
    """tiktoken's own loader keeps a copy of each file it reads under the temp dir; ours does not."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    Tokenizer.byte_level().save(tmp_path / "tokenizer.model")
    assert Tokenizer.from_file(tmp_path / "tokenizer.model", 258).encode("hi") == [104, 105]
    assert not (tmp_path / "cache").exists()


def test_llama3_tokenizer_file(tmp_path):
    """A tokenizer.model in Llama-3's format: ranks, then 256 special tokens right after them."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 256
    ranks[b" ab"] = 257
    with open(tmp_path / "tokenizer.model", "w") as f:
        for t, r in ranks.items():
            f.write(f"{base64.b64encode(t).decode()} {r}\n")
    tok = Tokenizer.from_file(tmp_path / "tokenizer.model", vocab_size=258 + 256)
    assert tok.bos_id == 258  # <|begin_of_text|> takes the first id after the ranks
    assert tok.eos_ids == {259, 258 + 8, 258 + 9}  # end_of_text, eom, eot
    assert tok.model.encode_single_token("<|reserved_special_token_246|>") == 258 + 255
    ids = tok.encode("ab ab x", bos=True)
    assert ids == [258, 256, 257, 32, ord("x")]
    assert tok.decode(ids[1:]) == "ab ab x"
    assert tok.encode("<|eot_id|>") != [258 + 9]  # special-token text in a prompt stays text
    with pytest.raises(ValueError, match="do not fit"):
        Tokenizer.from_file(tmp_path / "tokenizer.model", vocab_size=100)


def test_chat_format_uses_special_token_ids(tmp_path):
    """Llama-3's instruct format: headers and <|eot_id|> as single special ids; the text between stays text."""
    tok = Tokenizer({bytes([i]): i for i in range(256)}, n_special=256)
    start, end, eot = 256 + 6, 256 + 7, 256 + 9
    ids = tok.encode_chat(" hi <|eot_id|>\n", system="be brief")
    text = lambda s: tok.encode(s)
    assert ids == ([tok.bos_id, start] + text("system") + [end] + text("\n\nbe brief") + [eot, start] + text("user")
                   + [end] + text("\n\nhi <|eot_id|>") + [eot, start] + text("assistant") + [end] + text("\n\n"))
    assert eot in tok.eos_ids
    assert tok.encode_chat("hi")[:2] == [tok.bos_id, start] and tok.encode_chat("hi")[2:6] == text("user")
    with pytest.raises(ValueError, match="no <\\|start_header_id\\|>"):
        Tokenizer.byte_level().encode_chat("hi")
