"""refreshkv.py: a run on a tiny checkpoint, and a one-line error with exit status 2 for bad input."""
import json
import shutil

import pytest
import torch

import policies
import refreshkv
from model import ModelArgs, Transformer, save
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, hidden_dim=128,
                     max_seq_len=512, bos_id=256, eos_ids=[257])
    save(Transformer(args), path, Tokenizer.byte_level())
    return path


@pytest.fixture
def prompt(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("key-one: value-two\nkey-two: value-three\nStart: key-one\n" * 3)
    return f


def cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        refreshkv.main([str(a) for a in argv])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("policy, knobs", [("full", []), ("refreshkv", ["--budget", "0.25", "--stride", "3"]),
                                           ("refreshkv", ["--budget", "16", "--threshold", "0.9"]),
                                           ("snapkv", ["--window", "2"]), ("quest", ["--page-size", "8"])])
def test_generates_and_reports(capsys, ckpt, prompt, policy, knobs):
    code, out, err = cli(capsys, "--prompt", prompt, "--model", ckpt, "--policy", policy, *knobs,
                         "--max-new-tokens", 12)
    assert code == 0 and out.endswith("\n")
    stats = err.strip().splitlines()[-1]
    assert stats.startswith("prompt 166 tokens | generated 12 | prefill")
    if policy != "full":
        assert "full steps" in stats and "attention reads saved" in stats


def test_knob_flags_come_from_the_registry(monkeypatch, capsys, ckpt, prompt):
    """A class added to POLICIES gets its knobs as flags, its counters on the stats line; a knob
    named like a generation flag (seed) gets --<policy>-<knob>; **kwargs keeps the parent's knobs."""
    class Jittered(policies.RefreshKV):
        def __init__(self, seed: int = 0, **kw):
            super().__init__(**kw)
            self.seed = seed

        def stats(self):
            return dict(super().stats(), jitter_seed=self.seed)
    monkeypatch.setitem(policies.POLICIES, "jittered", Jittered)
    code, out, err = cli(capsys, "--prompt", prompt, "--model", ckpt, "--policy", "jittered", "--jittered-seed", 3,
                         "--stride", 2, "--refresh-only", "--seed", 1, "--max-new-tokens", 6)
    assert code == 0 and err.strip().endswith("| jitter seed 3")
    code, _, err = cli(capsys, "--prompt", prompt, "--model", ckpt, "--policy", "jittered", "--stride", "x")
    assert code == 2 and "stride wants int, got 'x'" in err


def test_sampling_is_seeded(capsys, ckpt, prompt):
    runs = [cli(capsys, "--prompt", prompt, "--model", ckpt, "--temperature", 1.0, "--top-p", 0.9,
                "--seed", s, "--max-new-tokens", 20)[1] for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "missing.txt"], "does not exist"),
    (["--prompt", "{empty}"], "is empty"),
    (["--prompt", "{binary}"], "not UTF-8"),
    (["--prompt", "{prompt}", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--prompt", "{prompt}", "--max-new-tokens", "400"], "exceeds the model's context of 512"),
    (["--prompt", "{prompt}", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "{prompt}", "--top-p", "0"], "--top-p must lie in (0, 1]"),
    (["--prompt", "{prompt}", "--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    (["--prompt", "{prompt}", "--model", "{nowhere}"], "no model directory"),
    (["--prompt", "{prompt}", "--model", "{prompt_dir}"], "no config.json"),
    (["--prompt", "{prompt}", "--policy", "nope"], "invalid choice"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "0"], "budget must be at least 1"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "1.5"], "fraction must lie in (0, 1]"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "lots"], "number of tokens or a fraction"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--stride", "0"], "stride >= 1"),
    (["--prompt", "{prompt}", "--policy", "snapkv", "--stride", "5"], "snapkv takes no --stride"),
    (["--prompt", "{prompt}", "--policy", "full", "--budget", "8"], "full takes no --budget"),
    (["--prompt", "{prompt}", "--policy", "streamingllm", "--budget", "4", "--sinks", "4"], "sinks < budget"),
    (["--prompt", "{prompt}", "--policy", "snapkv", "--budget", "8", "--window", "8"], "window < budget"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--pool", "4"], "odd pool"),
    (["--prompt", "{prompt}", "--policy", "tova", "--pool", "7"], "tova takes no --pool"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, ckpt, prompt, argv, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    paths = dict(empty=tmp_path / "empty.txt", binary=tmp_path / "binary.txt", prompt=prompt,
                 nowhere=tmp_path / "nowhere", prompt_dir=prompt.parent)
    argv = [a.format(**paths) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(ckpt)]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("refreshkv: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_cuda_requested_without_gpu(capsys, prompt, ckpt):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = cli(capsys, "--prompt", prompt, "--model", ckpt, "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "tokenizer.model").write_text("".join((p / "tokenizer.model").read_text().splitlines(True)[:100])),
     "single bytes are not tokens"),
    (lambda p: (p / "tokenizer.model").write_bytes(bytes(range(256)) * 8), "line 1 is not 'base64-token rank'"),
    (lambda p: (p / "config.json").write_text("[]"), "config.json is not a JSON object"),
    (lambda p: (p / "config.json").write_text(json.dumps(dict(json.loads((p / "config.json").read_text()),
                                                              max_position_embeddings=None))),
     "max_position_embeddings must be a positive integer, got null"),
])
def test_broken_checkpoint_is_one_short_line(capsys, tmp_path, ckpt, prompt, breakage, message):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    breakage(broken)
    code, out, err = cli(capsys, "--prompt", prompt, "--model", broken)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1 and len(err) < 300, err
