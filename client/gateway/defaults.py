"""Sampling defaults for requests that leave them out: the model's own, where its bundle records them.

A model's ``generation_config.json`` says how its authors meant it to be sampled; a small model sampled at
temperature 1 (OpenAI's default) answers noticeably worse. The exporter is to record those values in the manifest
as ``generation`` (transformers' field names: ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
``repetition_penalty``); a manifest without them leaves every default as it was. Nothing here imports the
gateway, so the command-line client can use it too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")
# Where neither the request nor the model says: the OpenAI API's defaults.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


def model_defaults(manifest: Any) -> dict[str, float | int]:
    """The sampling values the manifest's ``generation`` record sets, under SamplingParams' names; {} without one.

    transformers samples only with ``do_sample`` true: a record with ``do_sample`` false means greedy (temperature
    0) whatever its temperature says.
    """
    raw = getattr(manifest, "generation", None)
    if raw is None:
        return {}
    if hasattr(raw, "model_dump"):
        raw = raw.model_dump(exclude_none=True)
    if not isinstance(raw, Mapping):
        log.warning("ignoring the manifest's generation defaults: expected an object, got %s", type(raw).__name__)
        return {}
    found = {name: raw[name] for name in SAMPLING_FIELDS if raw.get(name) is not None}
    if raw.get("do_sample") is False:
        found["temperature"] = 0.0
    return found


def sampling_defaults(model: Mapping[str, float | int], settings: Any) -> dict[str, float | int]:
    """The values a request that leaves sampling out gets, in order of precedence: ``top_k`` and
    ``repetition_penalty`` set on purpose in the client settings (OpenAI's API has neither), the model's own
    defaults, then OpenAI's defaults and the settings' built-in ones."""
    chosen: dict[str, float | int] = {**OPENAI_DEFAULTS, "top_k": settings.top_k,
                                      "repetition_penalty": settings.repetition_penalty}
    chosen.update(model)
    chosen.update({name: getattr(settings, name) for name in ("top_k", "repetition_penalty")
                   if name in settings.model_fields_set})
    return chosen
