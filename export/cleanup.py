"""A failed export leaves nothing behind that it created: no empty bundle folders, no half-written graphs.

Only what did not exist before the export is removed. A directory the user already had (a parent such as
``bundles/``, or an earlier bundle being re-exported with --force) keeps every file it held before; files the export
overwrote stay as they are, since the old contents are gone either way.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def removed_on_failure(out: Path) -> Iterator[None]:
    """Run an export into ``out``; if it raises (or is interrupted), remove what it created, then re-raise."""
    out = Path(out).absolute()
    root = _outermost_missing(out) or out
    before = _tree(root)
    try:
        yield
    except BaseException:
        _remove_new(root, before)
        raise


def _outermost_missing(out: Path) -> Path | None:
    """The outermost of ``out`` and its parents that does not exist yet (None: ``out`` exists)."""
    missing = None
    for path in (out, *out.parents):
        if path.exists():
            break
        missing = path
    return missing


def _tree(root: Path) -> set[Path]:
    if not root.exists():
        return set()
    return {root, *root.rglob("*")} if root.is_dir() else {root}


def _remove_new(root: Path, before: set[Path]) -> None:
    new = _tree(root) - before
    # Only the outermost new paths: removing a new folder removes what it holds.
    outermost = [p for p in new if p.parent not in new]
    try:
        for path in outermost:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    except OSError as e:  # the cleanup must never hide the error that made it necessary
        log.warning("could not remove what the failed export wrote under %s: %s", root, e)
        return
    if outermost:
        log.info("removed what the failed export wrote: %s", ", ".join(sorted(str(p) for p in outermost)))
