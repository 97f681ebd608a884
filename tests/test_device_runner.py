"""The KV slots the service's one runner binds on its device (here the CPU provider: the CUDA path's code): written in
place, never copied, and exactly as large as the manifest says."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from conftest import TINY, bundles

from services.app import load_service
from services.settings import ServerSettings
from splitcore.cudagraphs import DecodeGraphs, bucket, buckets
from splitcore.errors import SplitError
from splitcore.graphs import TailRunner
from splitcore.providers import active_providers, session_options


@pytest.fixture(scope="module")
def server(export_bundle):
    return bundles(export_bundle(TINY, 2))[1]


def test_steps_write_the_slots_in_place_and_copy_no_kv(server):
    tail = TailRunner(server)
    pool = tail.new_pool(3, 40)
    slots = [pool.acquire() for _ in range(3)]
    # The pool's buffers: the device addresses bound as both past and present.
    buffers = pool.buffer_addresses()
    rng = np.random.default_rng(1)
    size = server.manifest.model.hidden_size
    tail.forward(rng.standard_normal((1, 5, size)).astype(np.float32), pool, slots[1])
    before = pool.host_view(0, 0, slots[1]).copy()
    for _ in range(4):
        tail.decode_rows(rng.standard_normal((3, 1, size)).astype(np.float32), pool, slots)
    assert pool.buffer_addresses() == buffers, "a KV buffer was reallocated"
    view = pool.host_view(0, 0, slots[1])
    start, end = buffers[0]
    assert view.shape[1] == 9 and start <= view.ctypes.data < end, "the slot is not the pool's own memory"
    np.testing.assert_array_equal(view[:, :5], before)  # earlier positions untouched, new ones appended in place
    assert np.abs(view[:, 5:]).sum() > 0


def test_kv_memory_per_session_is_what_the_manifest_says(server):
    manifest = server.manifest
    service = load_service(ServerSettings(bundle=server.root, max_sessions=5, slot_length=100), server)
    pool = service.engine.pool
    assert pool.slots == 5 and pool.max_length == 100
    assert pool.bytes_per_slot == manifest.kv_bytes_per_token(manifest.tail) * 101
    assert pool.nbytes == 5 * pool.bytes_per_slot
    # The KV byte budget caps the slot count; a budget below one slot is refused with one line.
    capped = load_service(ServerSettings(bundle=server.root, max_sessions=5, slot_length=100,
                                         max_kv_bytes=2 * pool.bytes_per_slot + 1), server)
    assert capped.engine.pool.slots == 2
    with pytest.raises(SplitError, match="one KV slot of 100 positions needs .* more than max_kv_bytes"):
        load_service(ServerSettings(bundle=server.root, slot_length=100, max_kv_bytes=1000), server)


def test_slots_are_clipped_to_the_models_positions(server):
    positions = server.manifest.model.max_position_embeddings
    service = load_service(ServerSettings(bundle=server.root, max_sessions=1, slot_length=positions * 4), server)
    assert service.engine.pool.max_length == positions


def test_a_requested_provider_that_did_not_start_is_an_error():
    cuda_cpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(SplitError, match="could not enable.*CUDAExecutionProvider"):
        active_providers(cuda_cpu, cuda_cpu, ["CPUExecutionProvider"])
    # Best-available (nothing requested) may fall back, and says so in the log.
    assert active_providers(None, cuda_cpu, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_cpu_graphs_spin_only_while_a_run_is_in_progress(server):
    """CPU intra-op threads spin during a run (a decode step is hundreds of small kernels) and stop when it returns;
    a GPU graph's session does not spin at all (its CPU pool idles through every run)."""
    options = TailRunner(server).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert session_options(spinning=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_cpu_threads_are_set_explicitly_within_the_cores_and_quota_given(tmp_path, monkeypatch):
    """The sessions' thread count is always explicit (onnxruntime's own default pins its threads to cores, and two
    processes on one machine then share the same ones): one per physical core this process may use, capped by a
    cgroup CPU quota."""
    from splitcore import providers

    assert session_options().intra_op_num_threads == providers.cpu_threads() >= 1
    assert session_options(3).intra_op_num_threads == 3
    cgroups, membership = tmp_path / "cgroup", tmp_path / "membership"
    cgroups.mkdir()
    membership.write_text("0::/\n")  # a container: its own cgroup is the root of what it sees
    (cgroups / "cpu.max").write_text("150000 100000\n")
    assert providers.cgroup_cpus(cgroups, membership) == 1.5
    (cgroups / "cpu.max").write_text("max 100000\n")
    assert providers.cgroup_cpus(cgroups, membership) is None
    (cgroups / "system.slice" / "split.service").mkdir(parents=True)  # a host process under systemd's CPUQuota
    (cgroups / "system.slice" / "split.service" / "cpu.max").write_text("300000 100000\n")
    membership.write_text("0::/system.slice/split.service\n")
    assert providers.cgroup_cpus(cgroups, membership) == 3.0
    (cgroups / "cpu.max").unlink()
    membership.write_text("")
    (cgroups / "cpu").mkdir()
    (cgroups / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # cgroup v1
    (cgroups / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert providers.cgroup_cpus(cgroups, membership) == 0.5
    assert providers.cgroup_cpus(tmp_path / "absent", membership) is None
    monkeypatch.setattr(providers, "cgroup_cpus", lambda: 0.5)
    assert providers.cpu_threads() == 1


def test_cuda_graph_buckets_cover_every_batch_with_few_graphs():
    """A captured decode step covers the first ``rows`` slots: each batch runs in the smallest bucket that holds its
    highest slot, and a pool of n slots needs about log2(n) graphs."""
    assert buckets(1) == [1] and buckets(16) == [1, 2, 4, 8, 16] and buckets(12) == [1, 2, 4, 8, 12]
    for slots in (1, 5, 16, 64):
        for highest in range(1, slots + 1):
            size = bucket(slots, highest)
            assert highest <= size <= slots and (size == slots or size < 2 * highest), (slots, highest, size)


def test_cuda_graphs_asked_for_on_the_cpu_change_nothing(server):
    """The service asks for CUDA graphs by default; on the CPU provider there are none, steps run as before and the
    engine does not wait to capture any."""
    plain, asked = TailRunner(server), TailRunner(server, cuda_graphs=True)
    assert asked.graphs is None
    size = server.manifest.model.hidden_size
    hidden = np.random.default_rng(2).standard_normal((2, 1, size)).astype(np.float32)
    outputs = []
    for tail in (plain, asked):
        pool = tail.new_pool(2, 16)
        slots = [pool.acquire() for _ in range(2)]
        outputs.append(tail.decode_rows(hidden, pool, slots))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    service = load_service(ServerSettings(bundle=server.root, max_sessions=2, slot_length=16), server)
    assert service.tail.graphs is None and service.engine.warming is False


def decode_graphs(tail: TailRunner, session=None) -> DecodeGraphs:
    """The CUDA-graph path's own object over ``tail``'s session, with its buffers on the CPU."""
    return DecodeGraphs(session or tail.session, tail.first_input, tail.output_name, tail.dtype, tail.output_dtype,
                        tail.output_width, tail.spec.past, tail.spec.present,
                        tail.bundle.manifest.model.max_position_embeddings, 0, device="cpu")


def test_the_cuda_graph_paths_bookkeeping_run_on_the_cpu_provider(server):
    """The code that feeds captured decode steps, run on the CPU provider (which ignores graph ids, so each "replay"
    is a plain run): outputs equal plain decode runs for rows that join and leave, a step that would pad many rows
    runs plainly, and a pool's graph buffers go with the pool."""
    tail = TailRunner(server)
    graphs = decode_graphs(tail)
    size = server.manifest.model.hidden_size
    rng = np.random.default_rng(3)
    plain, captured = tail.new_pool(12, 32), tail.new_pool(12, 32)
    for slot in range(12):
        prefix = rng.standard_normal((1, 2 + slot % 5, size)).astype(np.float32)
        for pool in (plain, captured):
            assert pool.acquire() == slot
            tail.forward(prefix, pool, slot)
    # The last step reads every slot the padded ones ran on zeros: their scratch writes must not show.
    for rows in ([0], [1, 3], [0, 1, 2, 3, 4, 5, 6, 7], [2, 9, 11], [4], list(range(12))):
        hidden = rng.standard_normal((len(rows), 1, size)).astype(np.float32)
        expected = tail.decode_rows(hidden, plain, rows)
        got = graphs.decode(hidden, captured, np.asarray(rows))
        captured.lengths[rows] += 1
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(plain.lengths, captured.lengths)
    assert graphs.plain_steps == 0 and graphs.issued == 4  # buckets 1, 4, 8 and 12
    # Slot 11 alone would run the 12-row graph: 11 padding rows, more than a plain run's 1.
    before = graphs.plain_steps
    assert graphs.decode(np.zeros((1, 1, size), np.float32), captured, np.asarray([11])) is None
    assert graphs.plain_steps == before + 1
    del captured, pool
    gc.collect()
    assert not graphs._graphs, "a freed pool's graph buffers were kept"


def test_a_failed_capture_turns_cuda_graphs_off_and_steps_run_plainly(server):
    class FailingRuns:  # a session whose captured runs fail (as a capture onnxruntime cannot complete would)
        def __init__(self, session):
            self.session = session

        def io_binding(self):
            return self.session.io_binding()

        def run_with_iobinding(self, binding, options=None):
            raise RuntimeError("CUDA graph capture failed")

    tail = TailRunner(server)
    graphs = decode_graphs(tail, FailingRuns(tail.session))
    pool = tail.new_pool(2, 16)
    pool.acquire()
    hidden = np.zeros((1, 1, server.manifest.model.hidden_size), np.float32)
    assert graphs.decode(hidden, pool, np.asarray([0])) is None
    assert graphs.disabled and not graphs.usable(pool) and graphs.capture(tail.new_pool(2, 16), hidden.shape[-1]) == 0
