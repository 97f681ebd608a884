"""Response bodies and server-sent-event chunks in the shapes of the OpenAI API (chat and legacy completions)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from client.gateway.engine import Usage


def usage_body(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass
class Reply:
    """One response (or one stream of chunks) for ``model``: ``chat`` or ``text`` completion."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": f"{obj}.chunk" if chunk and self.chat else obj, "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": choices}

    def whole(self, text: str, reason: str, usage: Usage) -> dict:
        choice: dict = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        return {**self._envelope([choice], chunk=False), "usage": usage_body(usage)}

    def chunk(self, text: str | None = None, reason: str | None = None, first: bool = False) -> str:
        choice: dict = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return sse(self._envelope([choice], chunk=True))

    def usage_chunk(self, usage: Usage) -> str:
        """The extra last chunk of ``stream_options.include_usage``: no choices, only usage."""
        return sse({**self._envelope([], chunk=True), "usage": usage_body(usage)})


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
