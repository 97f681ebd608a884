"""The client side of the split: the head, the tokenizer, and tail links to the service (or in process).

One ``Split`` per process: the command line and the gateway both build on it. It holds the one connection pool to
the tail service, so every conversation reuses its connections and TLS context.
"""

from __future__ import annotations

import logging
import threading

from client.bundles import find_bundle
from client.http import TailClient, Traffic
from client.remote import RemoteTail
from client.settings import ClientSettings
from client.tokenizer import ChatTokenizer
from splitcore.drafting import DraftTable, PromptLookup, StepCosts
from splitcore.errors import SplitError
from splitcore.generation import LocalTail, SplitGenerator, TailLink
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.manifest import Bundle
from splitcore.noise import BoundaryNoise
from splitcore.sampling import SamplingParams
from splitcore.tail_drafts import TailDrafter

log = logging.getLogger(__name__)


def sampling(settings: ClientSettings) -> SamplingParams:
    return SamplingParams(
        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
        repetition_penalty=settings.repetition_penalty, seed=settings.seed,
    )


def lm_head(client_bundle: Bundle, settings: ClientSettings) -> LmHeadRunner | None:
    """The client-side LM head of a private-output bundle; None when the tail returns logits."""
    if client_bundle.manifest.output_mode != "hidden":
        return None
    return LmHeadRunner(client_bundle, ["CPUExecutionProvider"], settings.intra_op_threads)


def draft_table(client_bundle: Bundle) -> DraftTable | None:
    """The bundle's draft table (speculation's second source after prompt lookup), when its export wrote one."""
    spec = client_bundle.manifest.drafts
    if spec is None:
        return None
    return DraftTable.load(client_bundle.path(spec.file), client_bundle.manifest.model.vocab_size)


class Split:
    """The head, and a factory of tail links (in process with ``local``, else on the tail service)."""

    def __init__(self, settings: ClientSettings, local: bool, keep_spare: bool = False) -> None:
        """``keep_spare``: after a conversation takes the session opened ahead of time, open the next one (once that
        conversation has its first token), so later conversations (the gateway's requests) skip the open's round
        trip too; it holds one idle session on the service, deleted on close."""
        self.settings = settings
        self.keep_spare = keep_spare
        self.bundle = find_bundle(settings.bundle, "client")
        # One pool (and TLS context) for every conversation of this process; None when the tail is in process.
        self.http = None if local else TailClient(settings.server_url, settings.ca_cert, settings.timeout_s,
                                                  settings.max_response_bytes)
        self.traffic = Traffic()  # every remote link's bytes, added up
        self.lm_head = lm_head(self.bundle, settings)
        self.draft_table = draft_table(self.bundle) if settings.speculate else None
        self.step_costs = StepCosts()  # what a drafted position costs against a step, learned across conversations
        self.spare_lock = threading.Lock()
        # The first conversation's session opens now, while the head and the tokenizer load, so neither a command
        # line run nor the first request to the gateway waits a round trip for it.
        self.spare: RemoteTail | None = None if local else self._open_spare()
        try:
            self._load(settings, local)
        except BaseException:
            self.close()
            raise

    def _open_spare(self, held: bool = False) -> RemoteTail:
        settings = self.settings.model_copy(update={"max_length": self.context})
        return RemoteTail.open(self.bundle, settings, sampling(self.settings), self.lm_head, self.http, self.traffic,
                               background=True, min_length=1, held=held)

    def _load(self, settings: ClientSettings, local: bool) -> None:
        self.links: list[TailLink] = []
        self.tokenizer = ChatTokenizer(self.bundle)
        self.head = HeadRunner(self.bundle, ["CPUExecutionProvider"], settings.intra_op_threads)
        self.noise = BoundaryNoise(settings.noise_sigma) if settings.noise_sigma > 0 else None
        self.local_tail = None
        self.tail_drafter: TailDrafter | None = None  # the in-process tail's own drafts
        if local:
            server = find_bundle(settings.bundle, "server")
            if server.manifest_sha256 != self.bundle.manifest_sha256:
                raise SplitError(
                    f"the client bundle {self.bundle.root} and the server bundle {server.root} come from different "
                    "exports; point --bundle at one export output directory"
                )
            self.local_tail = TailRunner(server, ["CPUExecutionProvider"], settings.intra_op_threads)
            if settings.speculate and server.manifest.tail_drafts is not None:
                self.tail_drafter = TailDrafter(server, ["CPUExecutionProvider"], settings.intra_op_threads)

    @property
    def remote(self) -> bool:
        return self.local_tail is None

    @property
    def context(self) -> int:
        """Positions a conversation may hold: the model's (from the manifest), or fewer when settings say so."""
        model = self.bundle.manifest.model.max_position_embeddings
        return min(model, self.settings.max_length) if self.settings.max_length else model

    def generator(self, max_length: int | None = None) -> SplitGenerator:
        """The one generator of a command-line run; opening it closes the previous one."""
        self.close_links()
        generator = self.new_generator(sampling(self.settings), max_length)
        self.links.append(generator.tail)
        return generator

    def new_generator(self, params: SamplingParams, max_length: int | None = None) -> SplitGenerator:
        """A generator with a tail link of its own (closing the link is the caller's job).

        ``max_length``: positions to reserve, here and on the tail service (default: ``context``).
        """
        # A one-shot answer needs exactly its reservation; a conversation asks for the whole context and works
        # with what the service's KV slots hold (at least one position).
        required = max_length
        max_length = max_length or self.context
        if self.local_tail is not None:
            link: TailLink = LocalTail(self.local_tail, params, self.lm_head, max_length, self.tail_drafter)
        elif (spare := self._take_spare(params)) is not None:
            spare.min_length = required or 1
            link = spare
        else:
            settings = self.settings.model_copy(update={"max_length": max_length})
            link = RemoteTail.open(self.bundle, settings, params, self.lm_head, self.http, self.traffic,
                                   background=True, min_length=required or 1)
        manifest = self.bundle.manifest
        lookahead = manifest.lookahead
        # A remote tail drafts where its bundle lets it (the service may have the feature off: then it sends none).
        tail_drafts = manifest.tail_drafts is not None and (self.remote or self.tail_drafter is not None)
        drafter = (PromptLookup(self.settings.max_draft, table=self.draft_table, costs=self.step_costs,
                                best_guess=max(lookahead.chances) if lookahead is not None else None,
                                tail_drafts=tail_drafts)
                   if self.settings.speculate else None)
        return SplitGenerator(self.head, link, self.settings.prefill_chunk, self.noise, drafter, max_length)

    def _take_spare(self, params: SamplingParams) -> RemoteTail | None:
        """The session opened ahead, when it was opened with ``params`` (one taker: the gateway opens conversations
        from several threads). With ``keep_spare`` the next one opens once this conversation has its first token:
        opening it now would compete with its prefill for the cores and the service (~2 ms of time to first token)."""
        with self.spare_lock:
            spare = self.spare
            if spare is None or spare.params != params:
                return None
            self.spare = following = self._open_spare(held=True) if self.keep_spare else None
        if spare.opening is not None:
            spare.opening.release()  # a spare still held back opens now, beside this conversation's prefill
        if following is not None:
            spare.after_first_step.append(following.opening.release)
        return spare

    def close_links(self) -> None:
        """Close the command line's links; a remote one deletes its session in the background."""
        for link in self.links:
            link.close()
        self.links.clear()

    def close(self) -> None:
        with self.spare_lock:
            spare, self.spare = self.spare, None
        if spare is not None:  # first: closing the links would release a spare held back, only to delete it
            spare.close()
        self.close_links()
        if self.http is not None:
            self.http.close()
