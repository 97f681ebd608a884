"""Print the requirements of pyproject extras, one per line, for ``pip install -r`` without installing the project.

The images install their dependencies this way (so the runtime image gets exactly ``.[server-gpu]`` and nothing
else), and so does scripts/gpu_check.sh. Self-references such as ``splitllm[service]`` are expanded.

    python3 scripts/extra_requirements.py server-gpu
    python3 scripts/extra_requirements.py export server-gpu dev --without onnxruntime
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def requirements(extras: list[str], without: set[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    seen: list[str] = []

    def add(extra: str) -> None:
        if extra not in optional:
            raise SystemExit(f"extra_requirements: no extra {extra!r} in {pyproject}; it has {sorted(optional)}")
        for requirement in optional[extra]:
            name, inner = NAME.match(requirement).groups()
            if name == project["name"]:
                for sub in (inner or "").split(","):
                    add(sub.strip())
            elif name.lower() not in without and requirement not in seen:
                seen.append(requirement)

    for requirement in project.get("dependencies", []):
        if NAME.match(requirement).group(1).lower() not in without:
            seen.append(requirement)
    for extra in extras:
        add(extra)
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("extras", nargs="+")
    p.add_argument("--without", action="append", default=[], help="leave out this distribution (repeatable)")
    args = p.parse_args(argv)
    print("\n".join(requirements(args.extras, {w.lower() for w in args.without})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
