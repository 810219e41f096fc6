"""Shared fixtures for the data tests: the byte tokenizer and a tiny word tokenizer."""

import pytest

from prefjax.tokenizer import ByteTokenizer


class WordTokenizer:
    """A whitespace tokenizer over a growing vocabulary: one token per word, so token counts in
    truncation tests are obvious from the text. Ids 0-2 are pad/bos/eos."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self):
        self.vocab = {}

    @property
    def vocab_size(self):
        return 3 + len(self.vocab)

    def encode(self, text):
        return [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv.get(i, f"<{i}>") for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        out = " ".join(f"{m['role']}: {m['content']} ;" for m in messages)
        return out + (" assistant:" if add_generation_prompt else "")


@pytest.fixture
def byte_tok():
    return ByteTokenizer()


@pytest.fixture
def word_tok():
    return WordTokenizer()
