"""The streaming detokenizer (tokenizers' DecodeStream) gives the text the hand-written window decoder gave.

The reference below is the decoder client/tokenizer.py had before: decode a short window of ids and emit what
grew, holding back incomplete UTF-8. Both must give the same pieces, token by token, and join to the full decode.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer

from client.tokenizer import StreamDecoder

SMOLLM2 = next(Path.home().glob(".cache/splitllm/SmolLM2-*/tokenizer.json"), None)
TEXTS = [
    "Hello world! The capital of France is Paris.",
    "héllo wörld — ünïcode 😀 emoji 🇫🇷 flags 中文字符 and Ω≈ç√",
    "  leading  spaces\n\nnewlines\tand tabs   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # code",
]


def window_decoder_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    pieces, prefix, read = [], 0, 0
    for i in range(1, len(ids) + 1):
        before = tokenizer.decode(ids[prefix:read])
        after = tokenizer.decode(ids[prefix:i])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            pieces.append("")
            continue
        prefix, read = read, i
        pieces.append(after[len(before):])
    return pieces


def byte_level() -> Tokenizer:
    from export.byte_tokenizer import byte_tokenizer

    return byte_tokenizer(512).backend_tokenizer


def tokenizers() -> list:
    found = [pytest.param(byte_level, id="random-tiny byte level")]
    if SMOLLM2 is not None:
        found.append(pytest.param(lambda: Tokenizer.from_file(str(SMOLLM2)), id="SmolLM2"))
    return found


@pytest.mark.parametrize("make", tokenizers())
def test_stream_decoder_matches_the_window_decoder(make):
    tokenizer = make()
    rng = random.Random(0)
    texts = [tokenizer.encode(text).ids for text in TEXTS]
    noise = [[rng.randrange(tokenizer.get_vocab_size()) for _ in range(150)] for _ in range(10)]
    for ids in texts + noise:
        decoder = StreamDecoder(SimpleNamespace(tokenizer=tokenizer))
        pieces = [decoder.push(i) for i in ids]
        assert pieces == window_decoder_pieces(tokenizer, ids)
        # Both hold back a trailing incomplete UTF-8 sequence, which a full decode shows as U+FFFD.
        full = tokenizer.decode(ids)
        assert "".join(pieces) == full if ids in texts else full.startswith("".join(pieces))
