"""``python -m client``: answer a prompt with the split model; the generated text is the only thing on stdout."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from client.bundles import find_bundle
from client.conversation import Conversation
from client.settings import ClientSettings
from client.tokenizer import ChatTokenizer, StreamDecoder
from splitcore.errors import SplitError
from splitcore.generation import LocalTail, SplitGenerator, TailLink
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.manifest import Bundle
from splitcore.noise import BoundaryNoise
from splitcore.sampling import SamplingParams

log = logging.getLogger("client")

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."

# Flags that map one-to-one onto ClientSettings fields; a flag given on the command line wins over the environment.
SETTING_FLAGS = {
    "--bundle": ("bundle", Path, "export output dir or client bundle"),
    "--server-url": ("server_url", str, "tail service URL"),
    "--token": ("token", str, "bearer token of the tail service"),
    "--ca-cert": ("ca_cert", Path, "CA certificate for an https server"),
    "--max-new-tokens": ("max_new_tokens", int, "most tokens to generate"),
    "--temperature": ("temperature", float, "0 is greedy"),
    "--top-p": ("top_p", float, "nucleus sampling mass"),
    "--top-k": ("top_k", int, "sample among the k best (0: all)"),
    "--repetition-penalty": ("repetition_penalty", float, "penalty on already generated tokens"),
    "--seed": ("seed", int, "seed for reproducible sampling"),
    "--system": ("system_prompt", str, "system prompt"),
    "--noise-sigma": ("noise_sigma", float, "noise on the hidden states sent, times their RMS (0: none)"),
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ClientSettings]:
    p = argparse.ArgumentParser(
        prog="python -m client", description="Split-inference client: text stays here.",
        epilog="`python -m client serve --help`: a local OpenAI-compatible server on the same split.",
    )
    p.add_argument("prompt", nargs="?", default=None, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--local", action="store_true", help="run the tail in this process too (no network)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--stats", action="store_true", help="print timing and traffic to stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    for flag, (dest, kind, help_text) in SETTING_FLAGS.items():
        p.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    args = p.parse_args(argv)
    overrides = {dest: getattr(args, dest) for dest, _, _ in SETTING_FLAGS.values() if getattr(args, dest) is not None}
    try:
        settings = ClientSettings(**overrides)
    except ValueError as e:
        p.error(str(e).replace("\n", " "))
    return args, settings


@dataclass
class Stats:
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0

    def token(self) -> None:
        self.tokens += 1
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def report(self, extra: str = "") -> str:
        end = time.perf_counter()
        ttft = (self.first_token or end) - self.started
        decode = end - (self.first_token or end)
        rate = (self.tokens - 1) / decode if self.tokens > 1 and decode > 0 else 0.0
        return (
            f"prompt {self.prompt_tokens} tokens, generated {self.tokens}; time to first token {ttft * 1000:.0f} ms; "
            f"decode {rate:.1f} tokens/s; total {end - self.started:.2f} s{extra}"
        )


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


class Split:
    """The client side of the split: the head, and a factory of tail links (in process or remote)."""

    def __init__(self, settings: ClientSettings, local: bool) -> None:
        self.settings = settings
        self.bundle = find_bundle(settings.bundle, "client")
        self.tokenizer = ChatTokenizer(self.bundle)
        self.head = HeadRunner(self.bundle, ["CPUExecutionProvider"], settings.intra_op_threads)
        self.lm_head = lm_head(self.bundle, settings)
        self.noise = BoundaryNoise(settings.noise_sigma) if settings.noise_sigma > 0 else None
        self.local_tail = None
        if local:
            server = find_bundle(settings.bundle, "server")
            if server.manifest_sha256 != self.bundle.manifest_sha256:
                raise SplitError(
                    f"the client bundle {self.bundle.root} and the server bundle {server.root} come from different "
                    "exports; point --bundle at one export output directory"
                )
            self.local_tail = TailRunner(server, ["CPUExecutionProvider"], settings.intra_op_threads)
        self.links: list[TailLink] = []

    def generator(self) -> SplitGenerator:
        """The one generator of a command-line run; opening it closes the previous one."""
        self.close()
        generator = self.new_generator(sampling(self.settings))
        self.links.append(generator.tail)
        return generator

    def new_generator(self, params: SamplingParams, max_length: int | None = None) -> SplitGenerator:
        """A generator with a tail link of its own (closing the link is the caller's job).

        ``max_length``: positions to reserve on the tail service, overriding the settings.
        """
        if self.local_tail is not None:
            link: TailLink = LocalTail(self.local_tail, params, self.lm_head)
        else:
            from client.remote import RemoteTail

            settings = self.settings
            if max_length is not None:
                settings = settings.model_copy(update={"max_length": max_length})
            link = RemoteTail.open(self.bundle, settings, params, self.lm_head)
        return SplitGenerator(self.head, link, self.settings.prefill_chunk, self.noise)

    def traffic(self) -> str:
        return "".join(link.traffic_report() for link in self.links if hasattr(link, "traffic_report"))

    def close(self) -> None:
        for link in self.links:
            if hasattr(link, "close"):
                link.close()
        self.links.clear()


def first_messages(settings: ClientSettings) -> list[dict]:
    return [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []


def stream(pieces, stats: Stats) -> str:
    text = []
    for piece in pieces:
        stats.token()
        text.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def run_once(split: Split, prompt: str, raw: bool, stats: Stats) -> None:
    settings = split.settings
    if raw or split.tokenizer.template is None:
        generator = split.generator()
        ids = split.tokenizer.encode(prompt)
        stats.prompt_tokens = len(ids)
        decoder = StreamDecoder(split.tokenizer)
        choices = generator.generate(ids, settings.max_new_tokens, split.tokenizer.stop_ids)
        stream((decoder.push(c.token) for c in choices), stats)
        return
    conversation = Conversation(split.tokenizer, split.generator)
    messages = [*first_messages(settings), {"role": "user", "content": prompt}]
    stream(conversation.reply(messages, settings.max_new_tokens), stats)
    stats.prompt_tokens = conversation.fed_new


def run_chat(split: Split, show_stats: bool) -> None:
    """Read user turns from stdin until EOF; each turn feeds only the new tokens into both KV caches."""
    conversation = Conversation(split.tokenizer, split.generator)
    messages = first_messages(split.settings)
    while True:
        sys.stderr.write("you> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stats = Stats()
        reply = stream(conversation.reply(messages, split.settings.max_new_tokens), stats)
        stats.prompt_tokens = conversation.fed_new
        messages.append({"role": "assistant", "content": reply})
        if show_stats:
            log.info("%s (reused %d cached positions)", stats.report(split.traffic()), conversation.reused)


def run(args: argparse.Namespace, settings: ClientSettings) -> None:
    split = Split(settings, args.local)
    try:
        if args.chat:
            run_chat(split, args.stats)
            return
        stats = Stats()
        run_once(split, args.prompt or DEFAULT_PROMPT, args.raw, stats)
        if args.stats:
            log.info("%s", stats.report(split.traffic()))
    finally:
        split.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # a prompt that is literally "serve" still works as `python -m client -- serve`
        from client.gateway.cli import main as serve

        return serve(argv[1:])
    args, settings = parse_args(argv)
    level = "DEBUG" if args.verbose else os.environ.get("LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if args.stats:
        log.setLevel(logging.INFO)
    try:
        run(args, settings)
    except SplitError as e:
        print(f"client: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
