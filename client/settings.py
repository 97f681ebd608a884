"""Client settings: environment variables with the SPLIT_CLIENT_ prefix; command-line flags override them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPLIT_CLIENT_", extra="forbid")

    bundle: Path = Field(Path("bundles/smollm2-k4"), description="export output dir, or its client/ bundle")
    server_url: str = "http://127.0.0.1:8000"
    token: str | None = Field(None, description="bearer token of the tail service")
    ca_cert: Path | None = Field(None, description="CA certificate to trust for https server URLs")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    system_prompt: str | None = None
    timeout_s: float = Field(60.0, gt=0, description="deadline of one request to the tail service, answer included")
    retry_budget_s: float = Field(
        20.0, ge=0, description="retries of a failing request start within this long of its first try (a restart "
        "takes 5-7 s); a request ends within retry_budget_s + timeout_s"
    )
    retries: int | None = Field(None, ge=0, description="most retries of one request (None: as the budget allows)")
    max_response_bytes: int = Field(1 << 20, ge=1024, description="largest answer read from the tail service")
    max_length: int | None = Field(None, ge=1, description="positions to reserve on the server (None: its default)")
    prefill_chunk: int = Field(512, ge=1)
    intra_op_threads: int = Field(
        0, ge=0, description="threads per graph; 0: one per physical core this process may use, within a CPU quota",
    )
    speculate: bool = Field(
        True, description="draft tokens by prompt lookup and let the tail verify several positions per round trip; "
        "the output is the same (greedy: identical; sampled: the same distribution)",
    )
    max_draft: int = Field(8, ge=1, le=64, description="most drafted tokens verified in one step")
    noise_sigma: float = Field(
        0.0, ge=0, description="Gaussian noise added to the hidden states sent, as a multiple of each position's RMS"
    )

    @field_validator("server_url")
    @classmethod
    def _has_scheme(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL; write e.g. http://{url.split('://')[-1]}")
        return url

    @field_validator("ca_cert")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a file; pass the PEM file of the CA that signed the service's certificate")
        return path


def explain(error: ValidationError, flags: dict[str, str], env_prefix: str = "SPLIT_CLIENT_") -> str:
    """A settings error as one line: which flag (or environment variable) got what, and what it should be.

    ``flags``: field name -> the command-line flag that set it; other fields came from the environment.
    """
    problems = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        where = flags.get(field) or f"{env_prefix}{field.upper()}"
        message = problem["msg"].removeprefix("Value error, ")
        value = problem.get("input")
        shown = repr(value) if isinstance(value, str) else str(value)
        problems.append(f"{where}: {message}" if value is None or str(value) in message else
                        f"{where}: {message} (got {shown})")
    return "; ".join(problems)
