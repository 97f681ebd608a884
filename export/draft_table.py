"""The draft table: n-grams the model itself tends to write, for speculation where the conversation offers none.

Prompt lookup drafts what a conversation repeats; open chat answers repeat little of their prompt (bench-wan: chat
1.03x at 30 ms RTT with lookup alone). At export the model answers a few generic requests (the bundle's chat
template; seeded sampling at temperature 0.7, top-k 50) and the table keeps, for each pair of consecutive tokens,
the token that most often followed it, with the counts that say how often it did. The client drafts from it when
lookup finds nothing, as many tokens as are worth their cost (splitcore/drafting.py); the tail verifies every
draft as always, so the output is what it would be without.

On SmolLM2, 16,384 sampled tokens take about 100 s on 2 cores. Random-weight models get no table by default: their
samples say nothing about what they will write.

The requests are generic on purpose: none of them is a benchmark prompt.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitcore.drafting import TABLE_ARRAYS
from splitcore.manifest import DraftTableSpec

log = logging.getLogger(__name__)

TABLE_FILE = "drafts.npz"  # in the client bundle
DEFAULT_TOKENS = 16384
REQUESTS = (
    "Tell me something interesting.",
    "Help me with a question.",
    "Write a paragraph.",
    "Explain a topic you know well.",
    "Give me some advice.",
    "Answer a question about science.",
    "Describe a place.",
    "Teach me something.",
)
# Other generic requests, answered greedily: how often the tail's look-ahead guesses right, measured on answers as a
# chat client usually asks for them (export/lookahead.py).
CALIBRATION_REQUESTS = (
    "What is a good way to learn a new language?",
    "Describe how a bicycle works.",
    "Why do leaves change color in autumn?",
    "Give me ideas for a rainy afternoon.",
    "How does a refrigerator keep food cold?",
    "What makes a good friend?",
    "Explain what a computer program is.",
    "Suggest a simple dinner recipe.",
)
ROWS = 16  # answers sampled at once per request
# How the answers are sampled: near the model's likely continuations, still varied. Chosen on chat prompts that are
# not the benchmark's (a replay of 7 chat answers at 30 ms RTT, 16,384 tokens): temperature 1 with no truncation
# 1.16x, temperature 1 top-k 50 1.16x, temperature 0.7 top-k 50 1.18x (lookup alone 1.14x).
TEMPERATURE = 0.7
TOP_K = 50


def write_draft_table(answers: Sequence[Answer], seed: int, client_dir: Path) -> DraftTableSpec:
    """Count ``answers`` (sample_answers) and write the table to ``client_dir``/drafts.npz."""
    contexts = [answer.prompt[-2:] + answer.tokens for answer in answers]
    arrays = count_ngrams(contexts)
    np.savez(client_dir / TABLE_FILE, **arrays)
    sampled = sum(len(answer.tokens) for answer in answers)
    return DraftTableSpec(file=TABLE_FILE, sampled_tokens=sampled, seed=seed, pairs=len(arrays["pair_next"]))


@dataclass
class Answer:
    prompt: list[int]  # the request, in the chat template
    tokens: list[int]  # the sampled answer, up to its first stop id (not included)


def sample_answers(model, tokenizer, stop_ids: Sequence[int], tokens: int, seed: int,
                   progress: Callable[[str], None] = lambda message: None) -> list[Answer]:
    """Up to ``tokens`` tokens of the model's own answers to REQUESTS (each ends at the first of ``stop_ids``: the
    ids the client stops on)."""
    new_tokens = max(8, tokens // (len(REQUESTS) * ROWS))
    stops = {int(t) for t in stop_ids}
    pad = min(stops, default=0)
    answers: list[Answer] = []
    with torch.random.fork_rng(), torch.no_grad():  # seeded here, and the caller's RNG state left as it was
        torch.manual_seed(seed)
        for i, request in enumerate(REQUESTS):
            progress(f"sampling {ROWS} answers of {new_tokens} tokens, request {i + 1}/{len(REQUESTS)}")
            prompt = prompt_ids(tokenizer, request)
            batch = torch.tensor([prompt] * ROWS, dtype=torch.long)
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=TEMPERATURE,
                                 top_k=TOP_K, top_p=1.0, max_new_tokens=new_tokens, pad_token_id=pad,
                                 eos_token_id=sorted(stops) or None)
            answers += [_until_stop(prompt, row, stops) for row in out[:, len(prompt) :].tolist()]
    return answers


def greedy_answers(model, tokenizer, stop_ids: Sequence[int], new_tokens: int) -> list[Answer]:
    """The model's greedy answers to CALIBRATION_REQUESTS, up to ``new_tokens`` each, in one batch padded on the left
    (masked: on SmolLM2 the same 8 x 128 tokens as one request at a time, in 9 s instead of 35)."""
    stops = {int(t) for t in stop_ids}
    pad = min(stops, default=0)
    prompts = [prompt_ids(tokenizer, request) for request in CALIBRATION_REQUESTS]
    width = max(len(prompt) for prompt in prompts)
    batch = torch.tensor([[pad] * (width - len(prompt)) + prompt for prompt in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             pad_token_id=pad, eos_token_id=sorted(stops) or None)
    return [_until_stop(prompt, row, stops) for prompt, row in zip(prompts, out[:, width:].tolist())]


def _until_stop(prompt: list[int], row: list[int], stops: set[int]) -> Answer:
    """The generated ``row`` up to its first stop id (generate pads a finished row with a stop id, too)."""
    end = next((j for j, t in enumerate(row) if t in stops), len(row))
    return Answer(prompt, row[:end])


def prompt_ids(tokenizer, request: str) -> list[int]:
    """``request`` as one user turn through the chat template, ready for the answer (the plain ids without one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in some transformers versions
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(request)["input_ids"]]


def count_ngrams(sequences: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """The table's arrays (splitcore.drafting.TABLE_ARRAYS): each pair's most frequent successor (ties: the smaller
    id), how often the pair was seen with a successor and how often that one followed; pairs in sorted order, so one
    corpus always gives the same file."""
    pairs: defaultdict[tuple[int, int], Counter] = defaultdict(Counter)
    for seq in sequences:
        for a, b, c in zip(seq, seq[1:], seq[2:]):
            pairs[(a, b)][c] += 1
    keys = sorted(pairs)
    best = [max(pairs[k].items(), key=lambda item: (item[1], -item[0])) for k in keys]
    arrays = {
        "pair_first": np.array([a for a, _ in keys], dtype=np.int32),
        "pair_second": np.array([b for _, b in keys], dtype=np.int32),
        "pair_next": np.array([token for token, _ in best], dtype=np.int32),
        "pair_seen": np.array([sum(pairs[k].values()) for k in keys], dtype=np.int32),
        "next_seen": np.array([count for _, count in best], dtype=np.int32),
    }
    assert tuple(arrays) == TABLE_ARRAYS
    return arrays
