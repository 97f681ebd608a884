"""Completions on the split, without HTTP: a prompt text in, text pieces and a finish record out (blocking)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from client.gateway.defaults import model_defaults, sampling_defaults
from client.gateway.errors import ContextLengthExceeded, invalid
from client.gateway.pool import ConversationPool
from client.gateway.sequence import CachedSequence
from client.gateway.stops import StopMatcher
from client.settings import ClientSettings
from client.split import Split
from splitcore.errors import ManifestError
from splitcore.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    ids: tuple[int, ...]  # the whole prompt, encoded
    max_tokens: int
    params: SamplingParams
    stops: tuple[str, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


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
    """The tokenizer, head and tail links of one bundle, and the pool of cached sequences they serve."""

    def __init__(self, split: Split, pool_size: int) -> None:
        self.split = split
        self.tokenizer = split.tokenizer
        manifest = split.bundle.manifest
        self.model_id = manifest.model.id
        created = manifest.export.get("created")
        self.created = int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()) if created else 0
        self.context = split.context
        self.defaults = self._defaults(model_defaults(manifest), split.settings)
        self.pool = ConversationPool(self.open_sequence, pool_size)

    @staticmethod
    def _defaults(model: dict, settings: ClientSettings) -> dict:
        chosen = sampling_defaults(model, settings)
        try:
            SamplingParams(**chosen)
        except (TypeError, ValueError) as e:
            raise ManifestError(
                f"the bundle's generation defaults {model} are not usable: {e}; re-run the export"
            ) from None
        if model:
            log.info("sampling defaults from the model: %s", model)
        return chosen

    def open_sequence(self, params: SamplingParams) -> CachedSequence:
        return CachedSequence(self.split.new_generator(params), self.tokenizer)

    def sampling(self, temperature: float | None, top_p: float | None, seed: int | None) -> SamplingParams:
        """The request's sampling parameters; what it leaves out comes from ``defaults``."""
        given = {"temperature": temperature, "top_p": top_p}
        return SamplingParams(**{**self.defaults, **{k: v for k, v in given.items() if v is not None}}, seed=seed)

    def job(self, text: str, max_tokens: int | None, params: SamplingParams, stops: tuple[str, ...] = (),
            param: str = "messages") -> Job:
        """Encode the prompt and check that it and the tokens asked for fit in the model's positions (``param``: the
        request field the prompt came from, for the error)."""
        ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise invalid("the prompt is empty: it encodes to no tokens; send some text", param=param)
        room = self.context - len(ids)
        if max_tokens is None and room >= 1:
            max_tokens = min(self.split.settings.max_new_tokens, room)
        if max_tokens is None or len(ids) + max_tokens > self.context:
            asked = f" and max_tokens asks for {max_tokens} more" if max_tokens else ""
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.context} tokens; the prompt has {len(ids)}{asked}; "
                "shorten the prompt or lower max_tokens", param
            )
        return Job(ids, max_tokens, params, stops)

    def run(self, job: Job, cancelled: threading.Event) -> Iterator[str | Finished]:
        """Text pieces (stop sequences cut out), then one ``Finished``; stops early when ``cancelled`` is set."""
        lease = self.pool.acquire(job.ids, job.params)
        sequence = lease.conversation
        clean = False
        try:
            cached = sequence.positions
            stops = StopMatcher(job.stops)
            produced, reason = 0, None
            pieces = sequence.complete(job.ids, job.max_tokens)
            for piece in pieces:
                produced += 1
                text, stopped = stops.push(piece)
                if text:
                    yield text
                if stopped or cancelled.is_set():
                    # Closing the generator at its yield leaves the caches holding every token fed so far; the
                    # token just yielded was not fed and is not held, so what the caches hold stays known.
                    pieces.close()
                    reason = "stop"
                    break
            else:
                if rest := stops.flush():
                    yield rest
                reason = sequence.finish_reason or "length"
            clean = True
            log.debug("%d prompt tokens (%d cached, %d fed), %d generated, %s%s", job.prompt_tokens, cached,
                      sequence.fed_new, produced, reason, " (client gone)" if cancelled.is_set() else "")
            yield Finished(reason, Usage(job.prompt_tokens, produced, cached))
        finally:
            self.pool.release(lease, clean)

    def close(self) -> None:
        self.pool.close()
        self.split.close()
