"""The bundle at each split layer the meter attacks: found in a bundles directory, or exported there once."""

from __future__ import annotations

import logging
from pathlib import Path

from export.__main__ import main as export_main
from export.__main__ import parse_args as export_parse_args
from splitcore.errors import SplitError
from splitcore.manifest import Bundle, load_bundle

log = logging.getLogger(__name__)


def load_pair(out: Path) -> tuple[Bundle, Bundle]:
    """The client and server bundle of one export output directory."""
    return load_bundle(out / "client", "client"), load_bundle(out / "server", "server")


def bundle_at(model: str, k: int, root: Path) -> tuple[Bundle, Bundle]:
    """``root/<model>-k<K>`` as ``make export`` names it; exported first when it is missing or broken."""
    out = root / export_parse_args(["--model", model, "--split-layer", str(k)]).out.name
    try:
        return load_pair(out)
    except SplitError as e:
        log.info("no usable bundle at %s (%s): exporting %s at K=%d", out, str(e).split(";")[0], model, k)
    if export_main(["--model", model, "--split-layer", str(k), "--out", str(out)]) != 0:
        raise SplitError(f"exporting {model} at K={k} into {out} failed; see the export log above")
    return load_pair(out)
