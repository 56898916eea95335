"""Long-input, long-output synthetic tasks for the bundled byte-level model.

Every task has the same shape: a long shuffled list of `key: value` lines (the
context), a question, and an answer written one line per item. The prompt ends
right where the model starts writing: after "Answer:\n" and the first line's key
and ":", so the very first generated token (" value") already needs a lookup in the
input. (Ending at ":" rather than ": " keeps the space with the word that follows it,
as a BPE tokenizer splits it in training text.)

    chain_of_key  every value is another key (the pairs form disjoint cycles, so
                  every key has exactly one successor); the answer follows the
                  chain from a start key, one hop per line: "k1\nk1: k2\nk2: k3\n".
                  Score = length of the correct prefix (the paper's measure).
    multi_key     values are 4-digit numbers; the answer gives the values of N
                  keys named in the question, in the order asked.
    id_range      records "417: word"; the answer lists the records of a range of
                  ids in increasing order, so which line is needed next is known
                  only by counting, and each line is somewhere else in the input.

Each answer line needs a different line of the input, which is what eviction
policies lose and RefreshKV's refresh brings back.

Pure Python, deterministic under a seed. The prompt files in examples/ were made by
    python tasks.py examples
which also prints their gold answers.
"""
import random
import sys
from dataclasses import dataclass

TASK_NAMES = ("chain_of_key", "multi_key", "id_range")
HEADERS = {
    "chain_of_key": "Key chain. Each line maps a key to the next key.\n",
    "multi_key": "Key values. Each line gives the value of a key.\n",
    "id_range": "Records by id.\n",
}

# pronounceable pseudo-words from consonant-vowel syllables
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
FINALS = "lnrs"


@dataclass
class Example:
    task: str
    prompt: str   # ends where the model starts writing
    answer: str   # gold continuation, ends with "\n"
    n: int        # number of items (hops, keys, records) = number of answer lines


class Words:
    """Draws pseudo-words that are unique and prefix-free within one example,
    so no key or value can be confused with a prefix of another."""

    def __init__(self, rng):
        self.rng, self.words, self.prefixes = rng, set(), set()

    def draw(self):
        while True:
            w = "".join(self.rng.choice(CONSONANTS) + self.rng.choice(VOWELS)
                        for _ in range(self.rng.randint(2, 3)))
            if self.rng.random() < 0.3:
                w += self.rng.choice(FINALS)
            if w in self.prefixes or any(w[:i] in self.words for i in range(1, len(w))):
                continue
            self.words.add(w)
            self.prefixes.update(w[:i] for i in range(1, len(w) + 1))
            return w

    def key(self):
        return self.draw() + "-" + self.draw()


def _fill(rng, budget, make_item, item_bytes, n_pairs, n_min):
    # draw items until their lines fill `budget` bytes (or exactly n_pairs items)
    items, used = [], 0
    while (len(items) < n_pairs) if n_pairs else (used < budget or len(items) < n_min):
        it = make_item()
        items.append(it)
        used += item_bytes(it)
    return items


# ---------------------------------------------------------------- worlds
# A world is the context text plus what questions need; ask_* draws one question.

def world_chain_of_key(rng, length=2000, n_pairs=None, min_cycle=9, reserve=80):
    words = Words(rng)
    budget = length - len(HEADERS["chain_of_key"]) - reserve
    # each key is written twice (as a key and as a value): 2*len + ": " + "\n"
    keys = _fill(rng, budget, words.key, lambda k: 2 * len(k) + 3, n_pairs, 2)
    m = len(keys)
    # split the keys into disjoint cycles (the chain asked about + distractor chains)
    min_cycle = max(2, min(min_cycle, m))
    n_cycles = rng.randint(1, max(1, m // min_cycle))
    sizes = [min_cycle] * n_cycles
    for _ in range(m - min_cycle * n_cycles):
        sizes[rng.randrange(n_cycles)] += 1
    succ, cycles, i = {}, [], 0
    for s in sizes:
        cyc = keys[i:i + s]
        i += s
        cycles.append(cyc)
        for j, k in enumerate(cyc):
            succ[k] = cyc[(j + 1) % s]
    lines = [f"{k}: {succ[k]}\n" for k in keys]
    rng.shuffle(lines)
    return dict(task="chain_of_key", context=HEADERS["chain_of_key"] + "".join(lines),
                succ=succ, cycles=cycles)


def ask_chain_of_key(rng, world, hops):
    cyc = rng.choice(world["cycles"])
    hops = max(1, min(hops, len(cyc) - 1))  # never revisit a key within an answer
    chain = [rng.choice(cyc)]
    for _ in range(hops):
        chain.append(world["succ"][chain[-1]])
    q = f"Question: follow the chain from {chain[0]} for {hops} hops.\nAnswer:\n{chain[0]}:"
    a = " " + chain[1] + "\n" + "".join(f"{x}: {y}\n" for x, y in zip(chain[1:], chain[2:]))
    return q, a, hops


def world_multi_key(rng, length=2000, n_pairs=None, reserve=80):
    words = Words(rng)
    budget = length - len(HEADERS["multi_key"]) - reserve
    keys = _fill(rng, budget, words.key, lambda k: len(k) + 7, n_pairs, 1)
    vals = rng.sample(range(1000, 10000), len(keys))
    value = {k: str(v) for k, v in zip(keys, vals)}
    lines = [f"{k}: {value[k]}\n" for k in keys]
    rng.shuffle(lines)
    return dict(task="multi_key", context=HEADERS["multi_key"] + "".join(lines),
                value=value, keys=keys)


def ask_multi_key(rng, world, n_keys):
    asked = rng.sample(world["keys"], max(1, min(n_keys, len(world["keys"]))))
    v = world["value"]
    q = f"Question: give the values of {', '.join(asked)}.\nAnswer:\n{asked[0]}:"
    a = " " + v[asked[0]] + "\n" + "".join(f"{k}: {v[k]}\n" for k in asked[1:])
    return q, a, len(asked)


def world_id_range(rng, length=2000, n_pairs=None, reserve=50):
    words = Words(rng)
    budget = length - len(HEADERS["id_range"]) - reserve
    vals = _fill(rng, budget, words.draw, lambda w: len(w) + 6, n_pairs, 1)
    start = rng.randint(100, max(100, 999 - len(vals) + 1))  # 3-digit ids, contiguous
    record = {start + i: w for i, w in enumerate(vals)}
    lines = [f"{i}: {w}\n" for i, w in record.items()]
    rng.shuffle(lines)
    return dict(task="id_range", context=HEADERS["id_range"] + "".join(lines),
                record=record, start=start)


def ask_id_range(rng, world, n_records):
    n = max(1, min(n_records, len(world["record"])))
    s = world["start"] + rng.randint(0, len(world["record"]) - n)
    ids = list(range(s, s + n))
    r = world["record"]
    q = f"Question: list records {ids[0]} to {ids[-1]}.\nAnswer:\n{ids[0]}:"
    a = " " + r[ids[0]] + "\n" + "".join(f"{i}: {r[i]}\n" for i in ids[1:])
    return q, a, n


WORLDS = {"chain_of_key": world_chain_of_key, "multi_key": world_multi_key,
          "id_range": world_id_range}
ASKS = {"chain_of_key": ask_chain_of_key, "multi_key": ask_multi_key,
        "id_range": ask_id_range}


# bytes per token of each task's text under the bundled model's vocabulary (measured on 300
# examples of 2,000 tokens), to size an example in tokens
BYTES_PER_TOKEN = {"chain_of_key": 2.13, "multi_key": 1.72, "id_range": 1.77}


# ---------------------------------------------------------------- examples

def make_example(task, seed, length=2000, n=4, n_pairs=None):
    """One (prompt, answer) example; n = hops / keys asked / records asked.
    `length` is the prompt's target size in bytes (within about 10%)."""
    rng = random.Random(f"{task}:{seed}")
    # leave room for the question (multi_key's names every key it asks for)
    kw = dict(min_cycle=n + 1) if task == "chain_of_key" else {}
    if task == "multi_key":
        kw = dict(reserve=48 + 16 * n)
    world = WORLDS[task](rng, length=length, n_pairs=n_pairs, **kw)
    q, a, n = ASKS[task](rng, world, n)
    return Example(task, world["context"] + q, a, n)


def chain_of_key(seed, length=2000, hops=4, n_pairs=None):
    return make_example("chain_of_key", seed, length, hops, n_pairs)


def multi_key(seed, length=2000, n_keys=4, n_pairs=None):
    return make_example("multi_key", seed, length, n_keys, n_pairs)


def id_range(seed, length=2000, n_records=4, n_pairs=None):
    return make_example("id_range", seed, length, n_records, n_pairs)


def training_rounds(rng, task, length, budget, n_max=12):
    """For training: one context and as many question/answer rounds as fit in
    `budget` more bytes (at least one). Returns (context, [(question, answer)])."""
    kw = dict(min_cycle=n_max + 1) if task == "chain_of_key" else {}
    world = WORLDS[task](rng, length=length, **kw)
    rounds, used = [], 0
    while True:
        q, a, _ = ASKS[task](rng, world, rng.randint(1, n_max))
        used += len(q) + len(a) + 1  # +1: the end-of-text token after each answer
        if rounds and used > budget:
            return world["context"], rounds
        rounds.append((q, a))


# ---------------------------------------------------------------- checkers

def item_scores(ex, output):
    """Per answer line: is the output's line right? (the output may lack the
    final newline or run on; only the first n lines count)."""
    gold = ex.answer.split("\n")[:ex.n]
    got = output.split("\n")[:ex.n]
    got += [None] * (ex.n - len(got))
    return [g == o for g, o in zip(gold, got)]


def score(ex, output):
    """chain_of_key and id_range: length of the correct prefix (a wrong hop
    breaks the chain); multi_key: number of keys answered right."""
    ok = item_scores(ex, output)
    if ex.task == "multi_key":
        return sum(ok)
    return next((i for i, x in enumerate(ok) if not x), len(ok))


def exact(ex, output):
    return score(ex, output) == ex.n


def hop_accuracy(scores, max_hops=8):
    """Exact match at hop h (h = 1..max_hops) over chain examples: share of
    outputs whose correct prefix reaches h hops."""
    return [sum(s >= h for s in scores) / max(1, len(scores)) for h in range(1, max_hops + 1)]


# ---------------------------------------------------------------- examples/

EXAMPLE_SPECS = [  # (file, task, seed, length, n)
    ("chain_of_key.txt", "chain_of_key", 1, 4400, 8),
    ("multi_key.txt", "multi_key", 1, 4400, 6),
    ("id_range.txt", "id_range", 1, 4400, 8),
]


def write_examples(out_dir="examples"):
    import os
    os.makedirs(out_dir, exist_ok=True)
    for fname, task, seed, length, n in EXAMPLE_SPECS:
        ex = make_example(task, seed, length, n)
        with open(os.path.join(out_dir, fname), "w", newline="") as f:
            f.write(ex.prompt)
        print(f"{fname}: {len(ex.prompt)} bytes, {ex.n} items; gold answer:\n{ex.answer}")


if __name__ == "__main__":
    write_examples(sys.argv[1] if len(sys.argv) > 1 else "examples")
