"""``python -m client``: answer a prompt with the split model; the generated text is the only thing on stdout.

Every failure ends in one line on stderr (``client: error: ...``) and exit code 2; nothing is generated before the
prompt and the tokens asked for are known to fit in the model's positions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from client.conversation import ContextExceeded, Conversation, fit
from client.remote import traffic_report
from client.settings import ClientSettings, explain
from client.split import Split
from client.tokenizer import text_pieces
from splitcore.errors import SplitError

log = logging.getLogger("client")

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."

# Flags that map one-to-one onto ClientSettings fields; a flag given on the command line wins over the environment.
SETTING_FLAGS = {
    "--bundle": ("bundle", Path, "export output dir or client bundle"),
    "--server-url": ("server_url", str, "tail service URL"),
    "--token": ("token", str, "bearer token of the tail service"),
    "--ca-cert": ("ca_cert", Path, "CA certificate for an https server"),
    "--max-new-tokens": ("max_new_tokens", int, "most tokens to generate (fewer when the model's context is full)"),
    "--temperature": ("temperature", float, "0 is greedy"),
    "--top-p": ("top_p", float, "nucleus sampling mass"),
    "--top-k": ("top_k", int, "sample among the k best (0: all)"),
    "--repetition-penalty": ("repetition_penalty", float, "penalty on already generated tokens"),
    "--seed": ("seed", int, "seed for reproducible sampling"),
    "--system": ("system_prompt", str, "system prompt"),
    "--noise-sigma": ("noise_sigma", float, "noise on the hidden states sent, times their RMS (0: none)"),
}


class UsageError(SplitError):
    """The command line or the settings it makes are wrong."""


def settings_from(args: argparse.Namespace, flags: dict[str, tuple]) -> ClientSettings:
    """ClientSettings from the environment, with the flags that were given on top; errors as one line."""
    overrides = {dest: getattr(args, dest) for dest, _, _ in flags.values() if getattr(args, dest) is not None}
    if getattr(args, "speculate", None) is False:
        overrides["speculate"] = False
    try:
        return ClientSettings(**overrides)
    except ValidationError as e:
        given = {dest: flag for flag, (dest, _, _) in flags.items() if dest in overrides}
        raise UsageError(explain(e, given)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m client", description="Split-inference client: text stays here.",
        epilog="`python -m client serve --help`: a local OpenAI-compatible server on the same split.",
    )
    p.add_argument("prompt", nargs="?", default=None,
                   help=f"the prompt (default: stdin when it is not a terminal, else {DEFAULT_PROMPT!r})")
    p.add_argument("--local", action="store_true", help="run the tail in this process too (no network)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (the prompt, if any, opens it)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--stats", action="store_true", help="print timing and traffic to stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    p.add_argument("--no-speculate", dest="speculate", action="store_false", default=None,
                   help="one token per round trip (default: drafts from the prompt verified several at a time)")
    for flag, (dest, kind, help_text) in SETTING_FLAGS.items():
        p.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    return p.parse_args(argv)


def read_prompt(given: str | None, stdin=None) -> str:  # noqa: ANN001 - any text stream
    """The prompt argument; without one, stdin when it is not a terminal, else the built-in question."""
    stdin = sys.stdin if stdin is None else stdin
    if given is None:
        if stdin is None or stdin.isatty():
            return DEFAULT_PROMPT
        given = stdin.read()
        if not given.strip():
            raise UsageError("no prompt: stdin was empty; pass the prompt as an argument or pipe it in")
    if not given.strip():
        raise UsageError("the prompt is empty; pass some text (or no argument at all for the built-in question)")
    return given


@dataclass
class Stats:
    """One answer's counters: tokens and bytes of the same turn."""

    traffic_before: tuple[int, int, int, int] | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0

    def token(self) -> None:
        self.tokens += 1
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def report(self, traffic_now: tuple[int, int, int, int] | None = None) -> str:
        end = time.perf_counter()
        ttft = (self.first_token or end) - self.started
        decode = end - (self.first_token or end)
        rate = (self.tokens - 1) / decode if self.tokens > 1 and decode > 0 else 0.0
        line = (
            f"prompt {self.prompt_tokens} tokens, generated {self.tokens}; time to first token {ttft * 1000:.0f} ms; "
            f"decode {rate:.1f} tokens/s; total {end - self.started:.2f} s"
        )
        if traffic_now is not None and self.traffic_before is not None:
            line += traffic_report(tuple(now - before for now, before in zip(traffic_now, self.traffic_before)))
        return line


def start_stats(split: Split) -> Stats:
    return Stats(split.traffic.snapshot() if split.remote else None)


def end_stats(split: Split, stats: Stats) -> str:
    return stats.report(split.traffic.snapshot() if split.remote else None)


def first_messages(split: Split) -> list[dict]:
    prompt = split.settings.system_prompt
    return [{"role": "system", "content": prompt}] if prompt else []


def stream(pieces: Iterable[str], stats: Stats) -> str:
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
    """One answer; the prompt is checked against the model's positions before anything runs."""
    tokenizer = split.tokenizer
    if raw or tokenizer.template is None:
        ids = tokenizer.encode(prompt)
    else:
        ids = tokenizer.chat_ids([*first_messages(split), {"role": "user", "content": prompt}])
    max_new = fit(len(ids), 0, split.settings.max_new_tokens, split.context)
    stats.prompt_tokens = len(ids)
    generator = split.generator(max_length=len(ids) + max_new)
    stream(text_pieces(tokenizer, generator.generate(ids, max_new, tokenizer.stop_ids)), stats)


def run_chat(split: Split, opening: str | None, show_stats: bool) -> None:
    """Read user turns from stdin until EOF; each turn feeds only the new tokens into both KV caches."""
    conversation = Conversation(split.tokenizer, split.generator, split.context)
    messages = first_messages(split)
    while True:
        if opening is not None:
            line, opening = opening, None
        else:
            sys.stderr.write("you> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stats = start_stats(split)
        try:
            reply = stream(conversation.reply(messages, split.settings.max_new_tokens), stats)
        except ContextExceeded as e:
            messages.pop()  # refused before anything ran: the conversation goes on without this turn
            print(f"client: error: {e}", file=sys.stderr)
            continue
        stats.prompt_tokens = conversation.fed_new
        messages.append({"role": "assistant", "content": reply})
        if show_stats:
            log.info("%s (reused %d cached positions)", end_stats(split, stats), conversation.reused)


def run(args: argparse.Namespace, settings: ClientSettings) -> None:
    prompt = None if args.chat and args.prompt is None else read_prompt(args.prompt)
    split = Split(settings, args.local)
    try:
        if args.chat:
            run_chat(split, prompt, args.stats)
            return
        stats = start_stats(split)
        run_once(split, prompt, args.raw, stats)
        if args.stats:
            log.info("%s", end_stats(split, stats))
    finally:
        split.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # a prompt that is literally "serve" still works as `python -m client -- serve`
        from client.gateway.cli import main as serve

        return serve(argv[1:])
    args = parse_args(argv)
    level = "DEBUG" if args.verbose else os.environ.get("LOG_LEVEL", "WARNING").upper()
    if not isinstance(logging.getLevelName(level), int):
        print(f"client: error: LOG_LEVEL {level!r} is not one of DEBUG, INFO, WARNING, ERROR", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if args.stats:
        log.setLevel(logging.INFO)
    try:
        run(args, settings_from(args, SETTING_FLAGS))
    except SplitError as e:
        print(f"client: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
