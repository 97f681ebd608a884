"""Bad export arguments end in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from export.__main__ import main as export_main

ROOT = Path(__file__).resolve().parents[1]


def run_export(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def export_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same entry point without a new interpreter: most bad arguments need no second torch import."""
    try:
        code = export_main(list(args))
    except SystemExit as e:  # argparse errors exit with 2
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_unknown_hub_id_offline(tmp_path):
    """A subprocess, so the hub library starts in offline mode instead of waiting on the network."""
    result = run_export("--model", "no-such-org/no-such-model", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "cannot load no-such-org/no-such-model")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model", "random:nope"], ["unknown random config", "tiny"]),
        (["--model", "/definitely/missing/model.gguf"], ["does not exist"]),
        (["--model", TINY, "--split-layer", "0"], ["1..N-1"]),
        (["--model", TINY, "--split-layer", "4"], ["1..3", "4 layers"]),
        (["--model", TINY, "--dtype", "int4"], ["invalid choice"]),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, fragments):
    assert_one_line_error(export_in_process(capsys, *args, "--out", str(tmp_path / "out")), *fragments)


def test_unreadable_gguf(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF this is not a model")
    monkeypatch.setenv("SPLIT_CACHE_DIR", str(tmp_path))
    assert_one_line_error(export_in_process(capsys, "--model", str(broken), "--out", str(tmp_path / "out")),
                          "cannot read GGUF file")


def test_out_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = export_in_process(capsys, "--model", TINY, "--out", str(blocker / "bundle"))
    assert_one_line_error(result, "not writable")


def test_second_run_is_up_to_date(export_bundle):
    out = export_bundle(TINY, 2)
    result = run_export("--model", TINY, "--split-layer", "2", "--full", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stderr
