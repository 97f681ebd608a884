"""Completions on the split, without HTTP: a prompt text in, text pieces and a finish record out (blocking)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from client.conversation import Conversation
from client.gateway.errors import ContextLengthExceeded
from client.gateway.pool import ConversationPool
from client.gateway.stops import StopMatcher
from client.split import Split
from splitcore.sampling import SamplingParams

log = logging.getLogger(__name__)

OPENAI_DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Job:
    text: str  # the rendered prompt
    prompt_tokens: int
    max_tokens: int
    params: SamplingParams
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt positions the KV caches already held: not sent again


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" or "length"
    usage: Usage


class Engine:
    """The tokenizer, head and tail links of one bundle, and the pool of conversations they serve."""

    def __init__(self, split: Split, pool_size: int) -> None:
        self.split = split
        self.tokenizer = split.tokenizer
        model = split.bundle.manifest.model
        self.model_id = model.id
        reserve = split.settings.max_length
        self.context = min(model.max_position_embeddings, reserve) if reserve else model.max_position_embeddings
        self.pool = ConversationPool(self.open_conversation, pool_size)

    def open_conversation(self, params: SamplingParams) -> Conversation:
        return Conversation(self.tokenizer, lambda: self.split.new_generator(params, self.context))

    def sampling(self, temperature: float | None, top_p: float | None, seed: int | None) -> SamplingParams:
        """OpenAI's parameters, with the settings' top_k and repetition penalty (which OpenAI does not have)."""
        settings = self.split.settings
        return SamplingParams(
            temperature=OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=settings.top_k, repetition_penalty=settings.repetition_penalty, seed=seed,
        )

    def job(self, text: str, max_tokens: int | None, params: SamplingParams, stops: tuple[str, ...] = ()) -> Job:
        """Check that the prompt and the tokens asked for fit in the model's positions."""
        prompt = len(self.tokenizer.encode(text, add_special_tokens=False))
        room = self.context - prompt
        if max_tokens is None and room >= 1:
            max_tokens = min(self.split.settings.max_new_tokens, room)
        if max_tokens is None or prompt + max_tokens > self.context:
            asked = f" and max_tokens asks for {max_tokens} more" if max_tokens else ""
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.context} tokens; the prompt has {prompt}{asked}; "
                "shorten the prompt or lower max_tokens"
            )
        return Job(text, prompt, max_tokens, params, stops)

    def run(self, job: Job, cancelled: threading.Event) -> Iterator[str | Finished]:
        """Text pieces (stop sequences cut out), then one ``Finished``; stops early when ``cancelled`` is set."""
        lease = self.pool.acquire(job.text, job.params)
        conversation = lease.conversation
        clean = False
        try:
            cached = conversation.positions
            stops = StopMatcher(job.stops)
            produced, reason = 0, None
            pieces = conversation.complete(job.text, job.max_tokens)
            for piece in pieces:
                produced += 1
                text, stopped = stops.push(piece)
                if text:
                    yield text
                if stopped or cancelled.is_set():
                    pieces.close()  # the caches stay consistent: the last token was fed before it was yielded
                    reason = "stop"
                    break
            else:
                if rest := stops.flush():
                    yield rest
                reason = conversation.finish_reason or "length"
            clean = True
            log.debug("%d prompt tokens (%d cached, %d fed), %d generated, %s", job.prompt_tokens, cached,
                      conversation.fed_new, produced, reason)
            yield Finished(reason, Usage(job.prompt_tokens, produced, cached))
        finally:
            self.pool.release(lease, clean)

    def close(self) -> None:
        self.pool.close()
        self.split.close()
