"""Speculative decoding over HTTP: drafts verified by the tail service in one step, rollback carried by the next
step (X-Keep-Length), and a service killed mid-speculation replayed into the same greedy text."""

from __future__ import annotations

import pytest
from conftest import TINY, bundles
from drafts import OracleDrafts
from servers import free_port, service_thread, start_service_process, stop, wait_ready

from client.remote import RemoteTail
from client.settings import ClientSettings
from splitcore.generation import SplitGenerator
from splitcore.graphs import HeadRunner, LmHeadRunner
from splitcore.sampling import SamplingParams

# Child processes and real sockets: the full suite runs these, `make test-fast` skips them.
pytestmark = pytest.mark.slow

PROMPT = list(range(60, 76))


def generate(client, link, drafter=None, n=32, stop_at=None, on_token=None) -> list[int]:
    generator = SplitGenerator(HeadRunner(client), link, prefill_chunk=8, drafter=drafter)
    tokens = []
    for choice in generator.generate(PROMPT, n, stop_ids=()):
        tokens.append(choice.token)
        if on_token is not None:
            on_token(len(tokens))
    return tokens


def over_http(client, url, drafter=None, lm_head=None, **settings) -> tuple[list[int], RemoteTail]:
    link = RemoteTail.open(client, ClientSettings(server_url=url, **settings), SamplingParams(), lm_head)
    try:
        return generate(client, link, drafter), link
    finally:
        link.close()


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_over_http_with_drafts_equals_one_token_per_step(export_bundle, k):
    """Both runs cross the wire in fp16, so they see the same hidden states; only the step sizes differ."""
    out = export_bundle(TINY, k)
    client, _ = bundles(out)
    with service_thread(out / "server") as url:
        plain, plain_link = over_http(client, url)
        oracle = OracleDrafts(PROMPT, plain)
        drafted, link = over_http(client, url, oracle)
    assert drafted == plain
    assert 0 < oracle.accepted < oracle.proposed
    # Fewer round trips than tokens: what speculation is for.
    assert link.traffic.steps < plain_link.traffic.steps


def test_private_output_over_http_verifies_with_the_clients_lm_head(export_bundle):
    out = export_bundle(TINY, 2, private_output=True)
    client, _ = bundles(out)
    lm_head = LmHeadRunner(client)
    with service_thread(out / "server") as url:
        plain, _ = over_http(client, url, lm_head=lm_head)
        oracle = OracleDrafts(PROMPT, plain)
        assert over_http(client, url, oracle, lm_head)[0] == plain
    assert oracle.accepted > 0


def test_a_service_killed_mid_speculation_is_replayed_into_the_same_text(export_bundle):
    out = export_bundle(TINY, 2)
    client, _ = bundles(out)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service_process(out / "server", port)
    try:
        wait_ready(url)
        plain, _ = over_http(client, url)
        link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams())

        def kill_once(produced: int) -> None:
            nonlocal process
            if produced == 9:  # mid-run, with a rollback pending for the next step
                stop(process)
                process = start_service_process(out / "server", port)
                wait_ready(url)

        oracle = OracleDrafts(PROMPT, plain)
        assert generate(client, link, oracle, on_token=kill_once) == plain
        assert link.replays == 1 and oracle.accepted > 0
        link.close()
    finally:
        stop(process)
