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
    p = argparse.ArgumentParser(prog="python -m client", description="Split-inference client: text stays here.")
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


def local_tail(client_bundle: Bundle, settings: ClientSettings) -> TailLink:
    server = find_bundle(settings.bundle, "server")
    if server.manifest_sha256 != client_bundle.manifest_sha256:
        raise SplitError(
            f"the client bundle {client_bundle.root} and the server bundle {server.root} come from different "
            "exports; point --bundle at one export output directory"
        )
    runner = TailRunner(server, ["CPUExecutionProvider"], settings.intra_op_threads)
    return LocalTail(runner, sampling(settings), lm_head(client_bundle, settings))


def prompt_ids(tokenizer: ChatTokenizer, text: str, settings: ClientSettings, raw: bool) -> list[int]:
    if raw or tokenizer.template is None:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    messages.append({"role": "user", "content": text})
    return tokenizer.chat_ids(messages)


def answer(generator: SplitGenerator, tokenizer: ChatTokenizer, ids: list[int], settings: ClientSettings,
           stats: Stats) -> str:
    decoder = StreamDecoder(tokenizer)
    pieces = []
    stats.prompt_tokens += len(ids)
    for choice in generator.generate(ids, settings.max_new_tokens, tokenizer.stop_ids):
        stats.token()
        piece = decoder.push(choice.token)
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def run(args: argparse.Namespace, settings: ClientSettings) -> None:
    client_bundle = find_bundle(settings.bundle, "client")
    tokenizer = ChatTokenizer(client_bundle)
    head = HeadRunner(client_bundle, ["CPUExecutionProvider"], settings.intra_op_threads)
    if args.local:
        tail = local_tail(client_bundle, settings)
    else:
        from client.remote import RemoteTail

        tail = RemoteTail.open(client_bundle, settings, sampling(settings))
    noise = BoundaryNoise(settings.noise_sigma) if settings.noise_sigma > 0 else None
    generator = SplitGenerator(head, tail, settings.prefill_chunk, noise)
    stats = Stats()
    answer(generator, tokenizer, prompt_ids(tokenizer, args.prompt or DEFAULT_PROMPT, settings, args.raw),
           settings, stats)
    if args.stats:
        log.info("%s", stats.report(getattr(tail, "traffic_report", lambda: "")()))


def main(argv: list[str] | None = None) -> int:
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
