"""Llama-3 tokenizer through tiktoken: a rank file plus Llama-3's split pattern and special tokens."""
import base64
import hashlib
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

# The split pattern of meta-llama/llama3 tokenizer.py.
PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Llama-3.1's special tokens, in id order right after the base ranks; the rest are reserved.
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
           "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


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
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()  # so tiktoken's cache never serves a stale copy
        ranks = load_tiktoken_bpe(str(path), expected_hash=digest)
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

    def decode(self, ids):
        return self.model.decode(ids)

    def decode_bytes(self, ids):
        return self.model.decode_bytes(ids)
