"""The quick benchmark runs every available configuration and writes a report that makes sense."""

from __future__ import annotations

import json

import pytest
from conftest import TINY

from bench.__main__ import main as bench_main


@pytest.mark.slow  # one worker process per configuration, and the tail service for (d)
def test_quick_bench_writes_sane_json(export_bundle, tmp_path):
    fp32 = export_bundle(TINY, 2, full=True)
    int4 = export_bundle(TINY, 2, weights="int4", full=True)
    out = tmp_path / "reports"
    code = bench_main(["--quick", "--models", f"{TINY}:2", "--bundle", str(fp32), "--bundle", str(int4),
                       "--new-tokens", "8", "--repeats", "2", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "bench.json").read_text())
    http = "d" not in results["skipped"]
    expected = {"a", "b@fp32", "c@fp32", "b@int4", "c@int4"} | ({"d@fp32", "d@int4"} if http else set())
    assert (out / "bench.md").read_text().count("| random:tiny |") == len(expected)
    assert (out / "bench.png").stat().st_size > 1000
    assert results["bandwidth"]["best_gb_s"] > 0.1
    assert results["command"].startswith("python -m bench --quick")
    assert len(results["load_average"]) == 3
    (model,) = results["models"]
    assert model["split_layer"] == 2 and model["weights"] == ["fp32", "int4"] and model["missing_weights"] == {}
    kv = model["kv_bytes_per_token"]
    assert kv["client"] + kv["server"] == kv["whole model"] > 0
    runs = {r["key"]: r for r in model["runs"]}
    assert set(runs) == expected
    for row in runs.values():
        assert row["new_tokens"] == 8 and row["prompt_tokens"] == 32
        assert 0 < row["ttft_s"]["min"] <= row["ttft_s"]["median"] <= row["ttft_s"]["max"]
        assert row["decode_tokens_per_s"]["n"] == 2
        assert 0 < row["decode_tokens_per_s"]["min"] <= row["decode_tokens_per_s"]["median"]
        assert 0 < row["bandwidth_bound_share"] < 1.5
        assert all(v > 10 for v in row["peak_rss_mib"].values())
    # Same greedy tokens everywhere: in fp32 the ONNX graphs match transformers and the split matches the whole; with
    # int4 weights the split holds the same blocks as the one graph, so it matches (b) int4.
    assert {k: r["reference"] for k, r in runs.items()} == {k: "b@int4" if k.endswith("@int4") else "b@fp32"
                                                            for k in expected}
    assert all(r["tokens_agree_with_reference"] == 1.0 for r in runs.values())
    # Fewer bytes per token with 4-bit weights, and smaller graph files.
    assert runs["c@int4"]["weight_bytes_per_token"] < 0.5 * runs["c@fp32"]["weight_bytes_per_token"]
    steps = model["steps"]["schemes"]
    assert set(steps) == {"fp32", "int4"}
    assert steps["int4"]["head_file_bytes"] < steps["fp32"]["head_file_bytes"]
    assert steps["int4"]["tail_file_bytes"] < steps["fp32"]["tail_file_bytes"]
    assert all(v["head_step_ms"] > 0 and v["tail_step_ms"] > 0 for v in steps.values())
    assert steps["int4"]["quality_floors"]["scheme"] == "int4"
    ratio = model["steps"]["vs_fp32"]["int4"]
    assert ratio["head_step_fraction"] == steps["int4"]["head_step_ms"] / steps["fp32"]["head_step_ms"]
    # No anchors in quick mode: no ratios to report, and nothing was installed or skipped for them.
    assert model["ratios"] == [] and model["anchors_skipped"] == {}


def test_anchor_ratios_and_floors():
    from bench.report import anchor_ratios, meets

    def row(key, ttft, decode):
        return {"key": key, "prompt_tokens": 32, "ttft_s": {"median": ttft}, "decode_tokens_per_s": {"median": decode}}

    runs = [row("llama.cpp", 0.10, 100.0), row("c@int4", 0.05, 110.0), row("d@int4", 0.15, 85.0),
            row("c@fp32", 0.2, 30.0)]
    (ratio,) = anchor_ratios(runs)
    assert ratio["anchor"] == "llama.cpp" and ratio["weights"] == "int4"
    assert ratio["c_decode_vs_anchor"] == 1.1 and ratio["d_decode_vs_anchor"] == 0.85
    assert abs(ratio["d_ttft_vs_anchor"] - 1.5) < 1e-12
    assert meets("c_decode_vs_llama_cpp", 1.1) and not meets("d_decode_vs_llama_cpp", 0.85)
    assert not meets("d_ttft_vs_llama_cpp", 1.5) and meets("d_ttft_vs_llama_cpp", 1.2)


@pytest.mark.slow  # the tail service in a child process
def test_load_generator_reports_every_level(export_bundle, tmp_path):
    from bench.load import main as load_main

    out = tmp_path / "load"
    code = load_main(["--bundle", str(export_bundle(TINY, 2)), "--levels", "1,4", "--prompt", "8", "--steps", "4",
                      "--limit-s", "60", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "load.json").read_text())
    assert [level["sessions"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["errors"] == {} and level["rejected_sessions"] == 0
        assert level["tokens"] == 4 * level["sessions"]
        assert 0 < level["step_latency_ms"]["p50"] <= level["step_latency_ms"]["p99"]
