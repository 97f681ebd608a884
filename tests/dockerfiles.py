"""Just enough of a Dockerfile parser for the tests: stages, ENV, EXPOSE, USER, HEALTHCHECK, ENTRYPOINT and CMD."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    expose: list[int] = field(default_factory=list)
    user: str | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    run: list[str] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        return self.entrypoint + self.cmd


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form (JSON array): {args}"
    return value


def parse(path: Path) -> dict[str, Stage]:
    """Stages by name (unnamed ones by index); a stage built FROM another starts with its ENV and USER."""
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for keyword, args in instructions(path.read_text()):
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages))
            parent = stages.get(parts[0])
            stage = Stage(name, parts[0], dict(parent.env) if parent else {}, user=parent.user if parent else None)
            stages[name] = stage
        elif stage is None:
            continue
        elif keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                stage.env[key] = value
        elif keyword == "EXPOSE":
            stage.expose += [int(p.split("/")[0]) for p in args.split()]
        elif keyword == "USER":
            stage.user = args
        elif keyword == "ENTRYPOINT":
            stage.entrypoint, stage.cmd = exec_form(args), []
        elif keyword == "CMD":
            stage.cmd = exec_form(args)
        elif keyword == "HEALTHCHECK":
            stage.healthcheck = exec_form(args[args.index("CMD") + 3:].strip())
        elif keyword == "RUN":
            stage.run.append(args)
    return stages


def last_stage(stages: dict[str, Stage]) -> Stage:
    """The stage `docker build` builds without --target."""
    return list(stages.values())[-1]
