"""Tests for tasks.py: determinism, checkers, chain structure, lengths."""
import random
import re

import pytest

import tasks

KEY = r"[a-z]+-[a-z]+"


def parse_context(prompt, task):
    """The context's `key: value` lines as a dict (fails on a duplicate key)."""
    body = prompt[len(tasks.HEADERS[task]):prompt.index("Question: ")]
    pairs = [line.split(": ") for line in body.splitlines()]
    d = dict(pairs)
    assert len(d) == len(pairs)
    return d


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_deterministic_under_seed(task):
    a = tasks.make_example(task, 7, 1500, 5)
    b = tasks.make_example(task, 7, 1500, 5)
    c = tasks.make_example(task, 8, 1500, 5)
    assert a == b
    assert a.prompt != c.prompt
    r1 = tasks.training_rounds(random.Random(3), task, 1000, 400)
    r2 = tasks.training_rounds(random.Random(3), task, 1000, 400)
    assert r1 == r2


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
@pytest.mark.parametrize("length", [1000, 2000, 4000])
@pytest.mark.parametrize("n", [1, 4, 8])
def test_lengths_in_range(task, length, n):
    for seed in range(3):
        ex = tasks.make_example(task, seed, length, n)
        assert 0.9 * length <= len(ex.prompt) <= 1.1 * length
        assert ex.prompt.isascii() and ex.answer.isascii()
        assert ex.answer.endswith("\n") and ex.answer.count("\n") == ex.n == n


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_prompt_ends_at_first_answer_line(task):
    ex = tasks.make_example(task, 1, 1200, 3)
    assert ex.prompt.splitlines()[-2] == "Answer:"
    assert ex.prompt.endswith(":") and ex.answer.startswith(" ")
    first = ex.prompt.splitlines()[-1] + ex.answer.splitlines()[0]
    # the first answer line, completed, is a line of the context
    assert "\n" + first + "\n" in ex.prompt


@pytest.mark.parametrize("seed", range(10))
def test_chain_structure(seed):
    ex = tasks.chain_of_key(seed, length=2500, hops=8)
    succ = parse_context(ex.prompt, "chain_of_key")
    keys = set(succ)
    # every value is a key and every key has exactly one successor (disjoint cycles)
    assert set(succ.values()) == keys
    # keys are two pseudo-words; no key is a prefix of another, words never repeat
    assert all(re.fullmatch(KEY, k) for k in keys)
    words = [w for k in keys for w in k.split("-")]
    assert len(words) == len(set(words))
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    # the answer follows the chain: every hop is the value of the previous key
    start = re.search(rf"from ({KEY}) for 8 hops", ex.prompt).group(1)
    full = ex.prompt.splitlines()[-1] + ex.answer
    lines = full.splitlines()
    assert len(lines) == 8
    prev = start
    for line in lines:
        k, v = line.split(": ")
        assert k == prev and succ[k] == v
        prev = v
    assert len({start} | {line.split(": ")[1] for line in lines}) == 9  # no revisits


def test_multi_key_and_id_range_answers_match_context():
    ex = tasks.multi_key(3, length=2000, n_keys=5)
    val = parse_context(ex.prompt, "multi_key")
    asked = re.search(r"values of (.*)\.\n", ex.prompt).group(1).split(", ")
    assert ex.prompt.splitlines()[-1] + ex.answer == "".join(f"{k}: {val[k]}\n" for k in asked)
    ex = tasks.id_range(3, length=2000, n_records=6)
    rec = parse_context(ex.prompt, "id_range")
    a, b = map(int, re.search(r"records (\d+) to (\d+)\.", ex.prompt).groups())
    assert b - a + 1 == 6
    assert ex.prompt.splitlines()[-1] + ex.answer == "".join(f"{i}: {rec[str(i)]}\n" for i in range(a, b + 1))
    ids = sorted(map(int, rec))
    assert ids == list(range(ids[0], ids[0] + len(ids)))


def test_chain_checker_counts_correct_prefix():
    ex = tasks.chain_of_key(0, length=1500, hops=6)
    assert tasks.score(ex, ex.answer) == 6 and tasks.exact(ex, ex.answer)
    assert tasks.score(ex, ex.answer.rstrip("\n")) == 6      # missing final newline is fine
    assert tasks.score(ex, ex.answer + "junk\n") == 6         # run-on after the last hop ignored
    lines = ex.answer.split("\n")
    for bad in range(6):
        wrong = lines.copy()
        wrong[bad] = wrong[bad] + "x"
        out = "\n".join(wrong)
        assert tasks.score(ex, out) == bad                    # prefix stops at the first error
        assert not tasks.exact(ex, out)
        assert tasks.score(ex, "\n".join(lines[:bad])) == bad  # truncated output
    assert tasks.score(ex, "") == 0
    assert tasks.hop_accuracy([0, 3, 8, 8], 8) == [0.75, 0.75, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5]


def test_multi_key_checker_counts_items():
    ex = tasks.multi_key(0, length=1500, n_keys=4)
    assert tasks.score(ex, ex.answer) == 4 and tasks.exact(ex, ex.answer)
    lines = ex.answer.split("\n")
    lines[1] = lines[1][:-1] + "0" if not lines[1].endswith("0") else lines[1][:-1] + "1"
    assert tasks.score(ex, "\n".join(lines)) == 3            # not a prefix measure
    assert tasks.score(ex, "1234\n") in (0, 1)
    ex2 = tasks.id_range(0, length=1500, n_records=4)
    assert tasks.score(ex2, ex2.answer) == 4
    lines = ex2.answer.split("\n")
    lines[0] = "zz"
    assert tasks.score(ex2, "\n".join(lines)) == 0


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_training_rounds_fit_budget(task):
    rng = random.Random(0)
    for length, budget in [(200, 100), (1500, 500), (3000, 800)]:
        ctx, rounds = tasks.training_rounds(rng, task, length, budget)
        assert len(rounds) >= 1
        assert len(rounds) == 1 or sum(len(q) + len(a) + 1 for q, a in rounds) <= budget
        for q, a in rounds:
            assert q.startswith("Question: ") and a.endswith("\n")


def test_example_files_match_generator():
    import os
    for fname, task, seed, length, n in tasks.EXAMPLE_SPECS:
        path = os.path.join(os.path.dirname(__file__), "examples", fname)
        if os.path.exists(path):
            with open(path, newline="") as f:
                assert f.read() == tasks.make_example(task, seed, length, n).prompt
