"""Tokenizer and chat template of a client bundle, without transformers: `tokenizers` plus a sandboxed Jinja."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from splitcore.errors import ManifestError
from splitcore.manifest import Bundle
from splitcore.sampling import Choice


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


class GenerationBlock(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: it marks assistant tokens for training masks and
    renders its body unchanged, which is all inference needs."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:  # noqa: ANN001
    """transformers' tojson: no HTML escaping, keys in the given order, non-ASCII kept (Jinja's own does all three
    the other way, so JSON in a prompt would tokenize differently from what the model was trained on)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTokenizer:
    """Renders conversations with the model's chat template (as transformers does) and tokenizes them."""

    def __init__(self, bundle: Bundle) -> None:
        spec = bundle.manifest.tokenizer
        if spec is None:
            raise ManifestError(f"the bundle in {bundle.root} has no tokenizer: drive it with token ids")
        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(bundle.path(spec.file)))
        self.template = None
        if spec.chat_template_file:
            # The same environment transformers uses for chat templates.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols, GenerationBlock])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self.template = env.from_string(bundle.path(spec.chat_template_file).read_text())

    @property
    def stop_ids(self) -> list[int]:
        return list(self.spec.eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise ManifestError("this model has no chat template; send a raw prompt instead")
        return self.template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.spec.bos_token or "",
            eos_token=self.spec.eos_token or "",
        )

    def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation; the template writes any special tokens itself."""
        return self.encode(self.render(messages, add_generation_prompt), add_special_tokens=False)


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces ("" while a UTF-8 sequence is incomplete).

    ``tokenizers``' own incremental decoder: it decodes a short window, so each token costs the same however long
    the answer grows, and word-boundary spaces come out as in a full decode.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer.tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        return self.stream.step(self.tokenizer, token) or ""


def text_pieces(tokenizer: ChatTokenizer, choices: Iterable[Choice]) -> Iterator[str]:
    """The text of generated tokens as it streams: one piece per token ("" while UTF-8 is incomplete)."""
    decoder = StreamDecoder(tokenizer)
    for choice in choices:
        yield decoder.push(choice.token)
