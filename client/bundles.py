"""Find the client and server bundles under a path given by the user."""

from __future__ import annotations

from pathlib import Path

from splitcore.errors import ManifestError
from splitcore.manifest import MANIFEST_FILE, Bundle, Role, load_bundle, parse_manifest


def find_bundle(path: Path, role: Role) -> Bundle:
    """``path`` may be the export output directory (holding client/ and server/) or a bundle inside it."""
    candidates = (path / role, path, path.parent / role)
    for candidate in candidates:
        manifest_path = candidate / MANIFEST_FILE
        if not manifest_path.is_file():
            continue
        manifest = parse_manifest(manifest_path.read_bytes(), str(manifest_path))
        if all((candidate / name).is_file() for name in manifest.role_files(role)):
            return load_bundle(candidate, role)
    raise ManifestError(
        f"no {role} bundle at {path} (looked in {', '.join(str(c) for c in candidates)}); "
        "run `make export` first or pass --bundle"
    )
