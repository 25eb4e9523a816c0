"""A scripted model whose tokens are single bytes (id 256 is EOS): the backend-independent code — the generation
core, each server route — runs against it without loading any weights. Every log-probability is uniform and an
embedding is the text's byte histogram, so a test can say exactly what to expect."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cnllm.core.generation.base import LoadedModel, LoadOptions, TokenLogprob

EOS = 256
VOCAB = 257
UNIFORM = -math.log(VOCAB)


class ByteModel(LoadedModel):
    """Bytes are tokens, the worst case for multi-byte characters; it generates ``script`` then EOS (``eos=False``: none)."""

    backend = "test"
    bos_token = ""
    eos_token = ""
    bos_id = None
    options = LoadOptions()

    def __init__(self, script: bytes = b"", *, eos: bool = True, context_length: int = 64):
        self.path = Path("byte-model")
        self.script = list(script) + ([EOS] if eos else [])
        self.context_length = context_length
        self.vocab_size = VOCAB
        self.eos_ids = frozenset({EOS})
        self.produced = 0

    def text_ids(self, text, *, special):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def generate_ids(self, prompt_ids, params, max_tokens, cancel):
        for token in self.script:
            if cancel.is_set():
                return
            self.produced += 1
            yield token

    def prompt_logprobs(self, ids, top=0):
        pieces = self.token_pieces(ids)
        alternatives = [(self.token_text(i), UNIFORM) for i in range(top)]
        return [TokenLogprob(i, piece, None if n == 0 else UNIFORM, [] if n == 0 else alternatives) for n, (i, piece) in enumerate(zip(ids, pieces))]

    def tokenize_with_lengths(self, text):
        ids = self.tokenize(text, special=False)
        return ids, [1] * len(ids), [int(b & 0xC0 != 0x80) for b in ids]

    def target_logprobs(self, windows, first):
        return [np.full(len(w) - first, UNIFORM) for w in windows]

    def next_token_logprobs(self, prompts):
        return np.full((len(prompts), VOCAB), UNIFORM)

    def letter_piece_ids(self, letter):
        return {ord(letter)}

    def embed(self, texts):
        vectors = []
        for text in texts:
            counts = np.bincount(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), minlength=256).astype(float)
            vectors.append((counts / np.linalg.norm(counts)).tolist())
        return vectors, sum(len(text.encode("utf-8")) for text in texts)

    def chat_template_source(self):
        return None

    def describe(self):
        return {"path": str(self.path), "backend": self.backend}
