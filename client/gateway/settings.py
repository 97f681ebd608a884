"""Gateway settings: environment variables with the SPLIT_GATEWAY_ prefix; flags of `python -m client serve` win.

The model, tokenizer and tail service come from the client settings (SPLIT_CLIENT_*), shared with `python -m client`.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPLIT_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    allow_remote: bool = Field(False, description="permit a non-loopback bind address (needs api_key too)")
    api_key: SecretStr | None = Field(None, description="when set, every request needs 'Authorization: Bearer <key>'")
    pool_size: int = Field(8, ge=0, description="idle conversations kept for prefix reuse (each holds a tail session)")
    max_concurrent: int = Field(4, ge=1, description="requests generating at once; more wait their turn")
    max_stop: int = Field(4, ge=0, description="most stop sequences per request (OpenAI allows 4)")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="largest request body; a larger one is 413 "
                                "before it is read (2 MiB holds a 128k-token prompt of plain text)")

    @model_validator(mode="after")
    def _exposed_needs_key(self) -> GatewaySettings:
        if is_loopback(self.host):
            return self
        if not self.allow_remote:
            raise ValueError(
                f"host {self.host!r} is not a loopback address: prompts would be reachable from the network; "
                "pass --allow-remote (SPLIT_GATEWAY_ALLOW_REMOTE=1) and set SPLIT_GATEWAY_API_KEY to do that on purpose"
            )
        if self.api_key is None or not self.api_key.get_secret_value():
            raise ValueError(f"binding {self.host!r} needs an API key: set SPLIT_GATEWAY_API_KEY")
        return self
