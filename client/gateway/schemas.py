"""Request bodies of the OpenAI API that the gateway honours, and refusals for values it cannot honour.

Unknown fields are accepted and ignored (OpenAI clients send optional extras such as ``user``); a known field with
a value the split cannot honour is a 400 naming the field, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from client.gateway.errors import invalid

# Fields whose only honoured values are "not set" and the listed ones.
ONLY_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
}


def unicode_text(value: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (``"\\ud800"``) that no tokenizer can encode: refuse it here, as a 400."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"character {e.start} is a lone UTF-16 surrogate ({value[e.start]!r}); send valid Unicode text "
            "(a surrogate pair, or the character itself)"
        ) from None
    return value


Text = Annotated[str, AfterValidator(unicode_text)]


# Strict, as OpenAI's own API: true is not a temperature of 1, 3.0 is not a max_tokens and "yes" does not stream.
STRICT = ConfigDict(extra="allow", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    model_config = STRICT

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="omitted: 1, as in the OpenAI API")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # the sampler's generator takes 63 bits
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def check_supported(self) -> None:
        given = {**self.model_dump(exclude_unset=True), **(self.model_extra or {})}
        for name, allowed in ONLY_DEFAULTS.items():
            value = given.get(name)
            if value is not None and value not in allowed:
                shown = f"{value!r}"[:60]
                raise invalid(f"{name}={shown} is not supported by this gateway; leave it out", param=name,
                              code="unsupported_value")

    def stops(self, most: int) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > most:
            raise invalid(f"stop has {len(stops)} sequences, at most {most} are allowed", param="stop")
        return tuple(s for s in stops if s)

    @property
    def limit(self) -> int | None:
        return self.max_tokens


class ContentPart(BaseModel):
    model_config = STRICT

    type: str
    text: Text | None = None


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None

    def for_template(self) -> dict:
        """The message as chat templates expect it: text content only; ``developer`` is OpenAI's new ``system``."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                kinds = sorted({part.type for part in content if part.type != "text"})
                raise invalid(f"only text content is supported, got {', '.join(kinds)}", param="messages")
            content = "".join(part.text or "" for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(OpenAIRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(OpenAIRequest):
    prompt: Text | list[Text]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise invalid(f"prompt is a list of {len(self.prompt)} prompts; send one per request", param="prompt")
        return self.prompt[0]
