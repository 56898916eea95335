"""refreshkv.py: a run on a tiny checkpoint, and a one-line error with exit status 2 for bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import policies
import refreshkv
from model import ModelArgs, Transformer, load, save
from tokenizer import Tokenizer


def byte_level_ckpt(path, **shape):
    """A random-weight checkpoint with the byte-level vocabulary (258 ids) written to path."""
    torch.manual_seed(0)
    args = ModelArgs(n_kv_heads=2, vocab_size=258, bos_id=256, eos_ids=[257], **shape)
    save(Transformer(args), path, Tokenizer.byte_level())
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return byte_level_ckpt(tmp_path_factory.mktemp("ckpt"), dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=512)


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
    (["--prompt", "{prompt}", "--max-new-tokens", "348"], "exceeds the model's context of 512"),  # 166 + 348 - 1
    (["--prompt", "{prompt}", "--temperature", "-1"], "--temperature must be 0 (greedy) or a finite number"),
    (["--prompt", "{prompt}", "--temperature", "nan"], "--temperature must be 0 (greedy) or a finite number"),
    (["--prompt", "{prompt}", "--temperature", "inf"], "--temperature must be 0 (greedy) or a finite number"),
    (["--prompt", "{prompt}", "--temperature", "1e-40"], "--temperature must be 0 (greedy) or a finite number >= 0.001"),
    (["--prompt", "{prompt}", "--seed", str(2 ** 64)], "--seed must lie in [0, 2**64)"),
    (["--prompt", "{prompt}", "--threads", "0"], "--threads must be positive"),
    (["--prompt", "{prompt}", "--top-p", "0"], "--top-p must lie in (0, 1]"),
    (["--prompt", "{prompt}", "--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    (["--prompt", "{prompt}", "--model", "{nowhere}"], "no model directory"),
    (["--prompt", "{prompt}", "--model", "{prompt_dir}"], "no config.json"),
    (["--prompt", "{prompt}", "--policy", "nope"], "invalid choice"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "0"], "budget must be at least 1"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "1.5"], "fraction must lie in (0, 1]"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "lots"], "number of tokens or a fraction"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "inf"], "budget wants a number of tokens"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "nan"], "budget wants a number of tokens"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "1e999"], "budget fraction must lie in (0, 1], got inf"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--budget", "1000000000"], "more than the model's context of 512"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--threshold", "nan"], "threshold is a cosine similarity in (0, 1]"),
    (["--prompt", "{prompt}", "--policy", "refreshkv", "--threshold", "-1"], "threshold is a cosine similarity in (0, 1]"),
    (["--prompt", "{hello}", "--policy", "snapkv"], "too short for snapkv with budget 0.125, which gives it 1: give a budget of 2"),
    (["--prompt", "{hello}", "--policy", "h2o"], "too short for h2o with budget 0.125, which gives it 1: give a budget of 2"),
    (["--prompt", "{hello}", "--policy", "streamingllm"], "give a budget of 5 tokens or more (--budget 5)"),
    (["--prompt", "{hello}", "--compare", "full,streamingllm:sinks=2"], "give a budget of 3 tokens or more"),
    (["--prompt", "{prompt}", "--compare", "full,nope"], "unknown policy 'nope'"),
    (["--prompt", "{prompt}", "--compare", "snapkv", "--policy", "snapkv"], "leave out --policy"),
    (["--prompt", "{prompt}", "--compare", "full,snapkv", "--stride", "3"], "policy full or snapkv takes no --stride"),
    (["--prompt", "{prompt}", "--chat"], "--chat needs a Llama-3 Instruct tokenizer; this one has no <|start_header_id|>"),
    (["--prompt", "{prompt}", "--system", "be brief"], "--system goes with --chat"),
    (["--prompt", "{prompt}", "--plot", "{nowhere}/cache.png"], "--plot wants a .png file in an existing directory"),
    (["--prompt", "{prompt}", "--plot", "{prompt_dir}/cache.jpg"], "--plot wants a .png file"),
    (["--prompt", "{prompt}", "--plot", "{prompt_dir}/cache.png", "--plot-layer", "2"], "--plot-layer must lie in [0, 2)"),
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
    (tmp_path / "hello.txt").write_text("Hello")
    paths = dict(empty=tmp_path / "empty.txt", binary=tmp_path / "binary.txt", prompt=prompt,
                 nowhere=tmp_path / "nowhere", prompt_dir=prompt.parent, hello=tmp_path / "hello.txt")
    argv = [a.format(**paths) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(ckpt)]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("refreshkv: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert len(err) < 200 and not list(tmp_path.glob("*.png"))


def test_a_prompt_that_exactly_fits_the_context(capsys, ckpt, prompt):
    """166 prompt tokens + 347 new ones need 512 positions: the last new token is never fed back."""
    code, _, err = cli(capsys, "--prompt", prompt, "--model", ckpt, "--max-new-tokens", 347)
    assert code == 0 and "prompt 166 tokens | generated 347 |" in err


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


def test_compare_shows_each_continuation_where_it_departs_and_a_row_each(capsys, ckpt, prompt):
    code, out, err = cli(capsys, "--prompt", prompt, "--model", ckpt, "--compare",
                         "refreshkv:budget=8,stride=4,snapkv:budget=8", "--max-new-tokens", 24)
    assert code == 0
    labels = ["full", "refreshkv:budget=8,stride=4", "snapkv:budget=8"]  # full attention first, the reference
    assert [line[3:-3] for line in out.splitlines() if line.startswith("== ")] == labels
    rows = err.strip().splitlines()
    assert [row.split()[0] for row in rows] == labels
    assert all("generated 24" in row for row in rows) and "attention reads saved" in rows[1]
    for label, row in zip(labels[1:], rows[1:]):  # a departure is named in the text and in the row, or in neither
        text = out.split(f"== {label} ==")[1].split("== ")[0]
        assert ("-- departs from full attention at token" in text) == ("| departs at token" in row)


def test_departure_names_the_first_different_token():
    tok = Tokenizer.byte_level()
    ids = lambda s: list(s.encode())
    assert refreshkv.departure(ids("key-one: two"), ids("key-one: two"), tok) is None
    at, text = refreshkv.departure(ids("key-one: two"), ids("key-one: six"), tok)
    assert at == 10 and text == "after 'key-one: ' it writes 'six', full attention 'two'"
    assert refreshkv.departure(ids("key-one"), ids("key"), tok)[0] == 4  # one stopped earlier


@pytest.mark.parametrize("policy", [["--policy", "refreshkv", "--budget", "8", "--stride", "4"],
                                    ["--compare", "refreshkv:budget=8,stride=4,snapkv:budget=8"]])
def test_plot_writes_a_picture(capsys, tmp_path, ckpt, prompt, policy):
    from matplotlib.image import imread
    png = tmp_path / "cache.png"
    code, _, _ = cli(capsys, "--prompt", prompt, "--model", ckpt, *policy, "--max-new-tokens", 30, "--plot", png)
    assert code == 0
    image = imread(png)[..., :3]  # [height, width, RGB] in 0..1
    assert image.shape[0] > 300 and image.shape[1] > (900 if "--compare" in policy else 600)
    assert image.std() > 0.05  # not blank
    blue, red = image[..., 2] - image[..., 0] > 0.3, image[..., 0] - image[..., 2] > 0.3
    assert blue.sum() > 100 and red.sum() > 100  # attention held and attention lost, both drawn


@pytest.fixture(scope="module")
def instruct_ckpt(tmp_path_factory):
    """A Llama-3-style vocabulary (byte ranks, then 256 special tokens) and weights that always say <|eot_id|>:
    no layer adds anything, every embedding is the same vector, and only <|eot_id|>'s output row sees it."""
    path = tmp_path_factory.mktemp("instruct")
    tok = Tokenizer({bytes([i]): i for i in range(256)}, n_special=256)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=128,
                                  max_seq_len=512, bos_id=256, eos_ids=[257]))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_embeddings.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        model.output.weight[tok.model.encode_single_token("<|eot_id|>")] = 1.0
    save(model, path, tok)
    return path, tok


def test_chat_wraps_the_prompt_and_stops_at_eot(capsys, tmp_path, instruct_ckpt):
    path, tok = instruct_ckpt
    f = tmp_path / "question.txt"
    f.write_text("What is <|eot_id|>?\n")
    code, out, err = cli(capsys, "--prompt", f, "--model", path, "--chat", "--system", "Be brief.")
    assert code == 0 and out == "\n"  # the first new token ends the turn
    n = len(tok.encode_chat("What is <|eot_id|>?", system="Be brief."))
    assert f"prompt {n} tokens | generated 1 |" in err
    code, out, err = cli(capsys, "--prompt", f, "--model", path)  # a plain prompt: special-token text stays text
    assert f"prompt {1 + len(f.read_bytes())} tokens" in err


def run_script(*argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(Path(refreshkv.__file__)), *map(str, argv)], env=env, **kw)


@pytest.fixture(scope="module")
def slow_ckpt(tmp_path_factory):
    """A model big enough that a long generation is still running when the test interrupts it."""
    return byte_level_ckpt(tmp_path_factory.mktemp("slow"), dim=256, n_layers=4, n_heads=8, hidden_dim=512,
                           max_seq_len=4096)


def test_ctrl_c_ends_with_a_newline_the_stats_so_far_and_status_130(tmp_path, slow_ckpt, prompt):
    proc = run_script("--prompt", prompt, "--model", slow_ckpt, "--policy", "refreshkv", "--max-new-tokens", 3000,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)  # generation has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and first and out.endswith(b"\n")
    assert err.decode().startswith("prompt 166 tokens | generated ") and "Traceback" not in err.decode()
    assert len(err.decode().strip().splitlines()) == 1


def test_stdout_that_fails(tmp_path, ckpt, prompt):
    # a full disk: one line, status 2
    with open("/dev/full", "w") as full:
        proc = run_script("--prompt", prompt, "--model", ckpt, stdout=full, stderr=subprocess.PIPE)
        err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 2 and err == "refreshkv: error: cannot write to stdout: No space left on device\n"
    # a reader that has gone (`| head -c 20`): generation stops, the stats line still comes
    read, write = os.pipe()
    os.close(read)
    proc = run_script("--prompt", prompt, "--model", ckpt, stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 0 and err.startswith("prompt 166 tokens | generated 1 |") and len(err.splitlines()) == 1
    # stdout closed
    proc = subprocess.run(f"exec {sys.executable} {refreshkv.__file__} --prompt {prompt} --model {ckpt} >&-",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == "refreshkv: error: stdout is closed\n"


def test_cuda_requested_without_gpu(capsys, prompt, ckpt):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = cli(capsys, "--prompt", prompt, "--model", ckpt, "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err


@pytest.mark.parametrize("threshold", [1.0, 1e-6])
def test_plot_records_a_fired_check_step_as_a_full_step(ckpt, prompt, threshold):
    """The per-step trigger decides on the device; the picture must still mark the steps it fired
    (threshold 1: every step; a tiny threshold: only where the mean query turned around)."""
    import plot
    model, tok = load(ckpt, device="cpu", dtype=torch.float32)
    ids = tok.encode(open(prompt).read(), bos=True)
    policy = policies.build("refreshkv", {"budget": 8, "stride": 1, "threshold": threshold}, len(ids))
    rec = plot.record(policy, 1, 0)
    list(refreshkv.generate(model, ids, policy, max_new_tokens=12, graphs=False))
    assert len(rec.full) == 11 and (all(rec.full) if threshold == 1.0 else not all(rec.full))
    assert all(len(h) == (len(s) if f else 9) for f, h, s in zip(rec.full, rec.held, rec.scores))  # all, or K + itself
