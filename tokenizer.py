"""Llama-3 tokenizer through tiktoken: a rank file plus Llama-3's split pattern and special tokens."""
import base64
import binascii
from pathlib import Path

import tiktoken

# The split pattern of meta-llama/llama3 tokenizer.py.
PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Llama-3.1's special tokens, in id order right after the base ranks; the rest are reserved.
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
           "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


# The instruct format's tokens: <|start_header_id|>role<|end_header_id|>\n\n text <|eot_id|>
CHAT = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def read_ranks(path):
    """A rank file (one `base64-token rank` per line) -> {token bytes: rank}, checked: the ranks are
    0..n-1, each once, and every single byte is a token (else some text could not be encoded).
    Read here rather than by tiktoken's loader, which keeps a copy of every file it reads."""
    ranks = {}
    for i, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (binascii.Error, ValueError, IndexError):
            raise ValueError(f"line {i} is not 'base64-token rank'") from None
        if len(fields) > 2 or token in ranks:
            raise ValueError(f"line {i} is not 'base64-token rank'" if len(fields) > 2 else f"line {i} repeats a token")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"its {len(ranks)} ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{len(missing)} single bytes are not tokens (byte {missing[0]} is one)")
    return ranks


def special_tokens(n):
    """The first n Llama-3 special token names (256 for the real vocabulary)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(max(0, n - len(SPECIAL)))]
    return (SPECIAL + reserved)[:n]


class Tokenizer:
    def __init__(self, ranks, n_special=256, name="llama3"):
        names = special_tokens(n_special)
        self.model = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens={s: len(ranks) + i for i, s in enumerate(names)})
        self.n_words = self.model.n_vocab
        self.bos_id = self.model.encode_single_token("<|begin_of_text|>")
        self.eos_ids = {self.model.encode_single_token(s) for s in names
                        if s in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}

    @classmethod
    def from_file(cls, path, vocab_size):
        """Llama-3's `tokenizer.model` (one `base64-token rank` per line); the special tokens fill
        the ids from the last rank up to vocab_size."""
        ranks = read_ranks(path)
        if not 2 <= vocab_size - len(ranks) <= 256:
            raise ValueError(f"{len(ranks)} ranks do not fit vocab_size {vocab_size}")
        return cls(ranks, vocab_size - len(ranks), name=Path(path).stem)

    def save(self, path):
        """Write the ranks in the `tokenizer.model` format that from_file reads."""
        with open(path, "w") as f:
            for token, rank in sorted(self.ranks().items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")

    @classmethod
    def byte_level(cls):
        """256 single bytes + <|begin_of_text|>=256, <|end_of_text|>=257: the bundled model's vocabulary."""
        return cls({bytes([i]): i for i in range(256)}, n_special=2, name="bytes")

    def ranks(self):
        return self.model._mergeable_ranks

    def encode(self, text, bos=False):
        ids = self.model.encode(text, disallowed_special=())  # special-token text in a prompt stays plain text
        return [self.bos_id] + ids if bos else ids

    def encode_chat(self, text, system=None):
        """Llama-3's instruct format, with the real special-token ids: an optional system turn, the
        user turn, then the assistant header that the model continues (it ends its turn with <|eot_id|>)."""
        missing = [s for s in CHAT if s not in self.model.special_tokens_set]
        if missing:
            raise ValueError(f"--chat needs a Llama-3 Instruct tokenizer; this one has no {missing[0]}")
        start, end, eot = (self.model.encode_single_token(s) for s in CHAT)
        header = lambda role: [start] + self.encode(role) + [end] + self.encode("\n\n")
        turns = ([("system", system)] if system is not None else []) + [("user", text)]
        ids = [self.bos_id]
        for role, content in turns:
            ids += header(role) + self.encode(content.strip()) + [eot]
        return ids + header("assistant")

    def decode(self, ids):
        return self.model.decode(ids)

    def decode_bytes(self, ids):
        return self.model.decode_bytes(ids)
