"""The quick benchmark runs every available configuration and writes a report that makes sense."""

from __future__ import annotations

import json

from conftest import TINY

from bench.__main__ import main as bench_main


def test_quick_bench_writes_sane_json(export_bundle, tmp_path):
    split = export_bundle(TINY, 2, full=True)
    int8 = export_bundle(TINY, 2, quantize_head="int8")
    out = tmp_path / "reports"
    code = bench_main(["--quick", "--models", f"{TINY}:2", "--bundle", str(split), "--int8-bundle", str(int8),
                       "--new-tokens", "8", "--repeats", "2", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "bench.json").read_text())
    configs = 5 if "d" not in results["skipped"] else 4
    assert (out / "bench.md").read_text().count("| random:tiny |") == configs
    assert (out / "bench.png").stat().st_size > 1000
    assert results["bandwidth"]["best_gb_s"] > 0.1
    (model,) = results["models"]
    assert model["split_layer"] == 2
    kv = model["kv_bytes_per_token"]
    assert kv["client"] + kv["server"] == kv["whole model"] > 0
    runs = {r["config"]: r for r in model["runs"]}
    expected = {"a", "b", "c", "c8"} | ({"d"} if "d" not in results["skipped"] else set())
    assert set(runs) == expected
    for row in runs.values():
        assert row["new_tokens"] == 8 and row["prompt_tokens"] == 32
        assert 0 < row["ttft_s"]["min"] <= row["ttft_s"]["median"] <= row["ttft_s"]["max"]
        assert row["decode_tokens_per_s"]["median"] > 0 and row["decode_tokens_per_s"]["n"] == 2
        assert 0 < row["bandwidth_bound_share"] < 1.5
        assert all(v > 10 for v in row["peak_rss_mib"].values())
    # Same greedy tokens everywhere in fp32: the ONNX graphs match transformers, and the split matches the whole.
    assert runs["a"]["tokens_agree_with_reference"] == runs["c"]["tokens_agree_with_reference"] == 1.0
    assert 0 <= model["int8_head"]["greedy_agreement"] <= 1
    assert model["int8_head"]["head_file_bytes"]["int8"] < model["int8_head"]["head_file_bytes"]["fp32"]


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
