"""The tail's own drafts (splitcore/tail_drafts.py): exact output, drafts that are the model's own when the head sees
what the model saw, slots left as they were, a client that asks only while they pay, and the protocol's bounds."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import TINY
from drafts import FreePositions
from servers import service_thread

from client.remote import RemoteTail
from client.settings import ClientSettings
from splitcore import protocol, wire
from splitcore.drafting import TAIL_PROBE, TAIL_RETRY_STEPS, PromptLookup, StepCosts
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.manifest import load_bundle
from splitcore.sampling import SamplingParams
from splitcore.tail_drafts import DraftRow, TailDrafter

PROMPT = list(range(30, 44))


class Counting(PromptLookup):
    """Counts the tail's drafts it sent and how many the tail kept."""

    sent = kept = 0

    def update(self, proposed: int, accepted: int) -> None:
        if self.from_tail:
            self.sent += proposed
            self.kept += accepted
        super().update(proposed, accepted)


def runners(out):
    client, server = load_bundle(out / "client", "client"), load_bundle(out / "server", "server")
    return client, server, HeadRunner(client), TailRunner(server)


def plain_tokens(head, tail, n=40, prompt=PROMPT) -> list[int]:
    return [c.token for c in SplitGenerator(head, LocalTail(tail, SamplingParams())).generate(prompt, n)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tail_drafts_in_process_leave_greedy_output_alone(export_bundle, k):
    _, server, head, tail = runners(export_bundle(TINY, k))
    plain = plain_tokens(head, tail)
    drafter = Counting(costs=FreePositions(), tail_drafts=True)
    link = LocalTail(tail, SamplingParams(), drafter=TailDrafter(server))
    generator = SplitGenerator(head, link, drafter=drafter)
    assert [c.token for c in generator.generate(PROMPT, 40)] == plain
    assert drafter.sent > 0 and generator.verified_steps > 0


def test_with_the_whole_conversation_in_view_the_drafts_are_the_models_own_continuation(export_bundle):
    """The head's view is the only approximation: given the prompt as the prefix (the head then sees exactly what
    the model saw), every draft is kept, whatever the random weights."""
    _, server, head, tail = runners(export_bundle(TINY, 2))
    plain = plain_tokens(head, tail)
    drafter = TailDrafter(server)
    drafter.prefix, drafter.window = list(PROMPT), 4096
    counting = Counting(costs=FreePositions(), tail_drafts=True)
    generator = SplitGenerator(head, LocalTail(tail, SamplingParams(), drafter=drafter), drafter=counting)
    assert [c.token for c in generator.generate(PROMPT, 40)] == plain
    assert counting.sent > 10 and counting.kept == counting.sent


def test_drafting_leaves_every_slot_as_it_was(export_bundle):
    _, server, head, tail = runners(export_bundle(TINY, 2))
    pool = tail.new_pool(3, 64)
    hidden = np.random.default_rng(0).standard_normal((1, 10, tail.bundle.manifest.model.hidden_size))
    for slot in range(3):
        pool.acquire()
        tail.forward(hidden.astype(np.float32), pool, slot)
    before = [[pool.host_view(layer, kind, slot).copy() for layer in range(tail.num_layers) for kind in (0, 1)]
              for slot in range(3)]
    drafts = TailDrafter(server).draft(tail, pool, [DraftRow(0, 10, [5, 6, 7], 4), DraftRow(2, 8, [9], 3)])
    assert [len(d) for d in drafts] == [4, 3]
    assert list(pool.lengths) == [10, 10, 10]
    for slot, keep in ((0, 10), (1, 10), (2, 8)):  # slot 2 drafted from position 8: the positions after are scratch
        after = [pool.host_view(layer, kind, slot) for layer in range(tail.num_layers) for kind in (0, 1)]
        assert all(np.array_equal(a[:, :keep], b[:, :keep]) for a, b in zip(after, before[slot]))


def test_the_client_asks_for_as_many_drafts_as_pay():
    assert PromptLookup(costs=FreePositions()).tail_count() == 0, "a tail that does not draft is never asked"
    assert PromptLookup(tail_drafts=True).tail_count() == TAIL_PROBE, "before the cost is measured: a probe"
    slow_link = StepCosts()  # 30 ms round trips, a draft costs the tail 2 ms: drafts pay, many of them
    for _ in range(8):
        slow_link.observe(1, 0.030), slow_link.observe(3, 0.031)
        slow_link.observe_drafts(4, 0.008)
    assert PromptLookup(costs=slow_link, tail_drafts=True, max_draft=8).tail_count() == 8
    in_process = StepCosts()  # no link: a draft costs as much as the step it saves
    for _ in range(8):
        in_process.observe(1, 0.010), in_process.observe(3, 0.011)
        in_process.observe_drafts(4, 0.040)
    drafter = PromptLookup(costs=in_process, tail_drafts=True)
    assert drafter.tail_count() == 0
    for _ in range(TAIL_RETRY_STEPS):
        drafter.ask_tail(16)
    assert drafter.tail_count() == 1, "asked again now and then (one draft): links and loads change"
    missing = PromptLookup(costs=slow_link, tail_drafts=True)
    missing.observe(1, 0.03, None, 4, None), missing.observe(1, 0.03, None, 4, None)
    assert missing.tail_count() == 0, "a service with drafts off answers none: stop asking"
    empty = PromptLookup(costs=slow_link, tail_drafts=True)
    empty.observe(1, 0.03, None, 4, 0.001, 0), empty.observe(1, 0.03, None, 4, 0.001, 0)
    assert empty.tail_count() == 0, "a tail that answers with no drafts, time after time: stop asking"
    wrong = PromptLookup(costs=slow_link, tail_drafts=True, max_draft=8)
    for _ in range(100):
        wrong.tail_record.add(0, 8)  # none kept: the drafts do not hold in this conversation
    assert wrong.tail_count() == 0


def step(url, sid, sha, hidden, past, **headers) -> httpx.Response:
    h = {"Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: str(past), protocol.MANIFEST_HEADER: sha,
         **{f"X-{k.replace('_', '-')}": str(v) for k, v in headers.items()}}
    return httpx.post(f"{url}{protocol.steps_path(sid)}", content=wire.encode(hidden), headers=h)


def test_the_service_drafts_when_asked_and_knows_which_of_its_drafts_a_step_kept(export_bundle):
    out = export_bundle(TINY, 2)
    client, server, head, tail = runners(out)
    with service_thread(out / "server") as url:
        sha = client.manifest_sha256
        sid = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json={"manifest_sha256": sha}).json()["session_id"]
        cache = head.new_cache(256)
        first = step(url, sid, sha, head.forward(np.array([PROMPT]), cache), 0, Draft=3)
        assert first.status_code == 200, first.text
        assert "draft;dur=" in first.headers[protocol.SERVER_TIMING_HEADER]
        answer = first.json()
        assert len(answer["drafts"]) == 3 and answer["drafts_after"] == 0
        # The drafts back, with a wrong one second: the tail keeps the first and drafts after its own sample there.
        sent = [answer["token"], answer["drafts"][0], (answer["drafts"][1] + 1) % 512, answer["drafts"][2]]
        past = len(PROMPT)
        second = step(url, sid, sha, head.forward(np.array([sent]), cache), past, Draft=2, Drafted=3,
                      Sample_Count=4)
        result = second.json()
        assert second.status_code == 200 and result["length"] == past + 4, "the protocol's length is the step's"
        kept = next(i for i in range(3) if result["tokens"][i] != sent[i + 1])
        assert result["drafts_after"] == kept and len(result["drafts"]) == 2
        # The client rolls back to what it kept. A step that claims more drafts than the tail holds (it kept 2) is
        # answered, with no new drafts: the tail cannot tell which of its samples is kept last.
        cache.truncate(0, past + kept + 1)
        ids = [result["tokens"][kept], 7, 8, 9]
        third = step(url, sid, sha, head.forward(np.array([ids]), cache), past + kept + 1,
                     Keep_Length=past + kept + 1, Draft=2, Drafted=3, Sample_Count=4)
        assert third.status_code == 200 and third.json()["drafts"] == [] and len(third.json()["tokens"]) == 4
        drafted = re.search(r"^split_tail_drafts_total (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
        assert drafted is not None and float(drafted.group(1)) == 5, "3 drafts, then 2, then none"


@pytest.mark.slow
def test_tail_drafts_over_http_with_many_sessions_at_once(export_bundle):
    out = export_bundle(TINY, 2)
    client, _, head, tail = runners(out)
    plain = plain_tokens(head, tail, 24)

    def run(url: str) -> tuple[list[int], Counting]:
        drafter = Counting(costs=FreePositions(), tail_drafts=True)
        link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams())
        try:
            tokens = [c.token for c in SplitGenerator(head, link, drafter=drafter).generate(PROMPT, 24)]
        finally:
            link.close()
        return tokens, drafter

    with service_thread(out / "server") as url:
        tokens, drafter = run(url)
        assert tokens == plain and drafter.sent > 0
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda _: run(url), range(8)))
    assert all(tokens == plain and drafter.sent > 0 for tokens, drafter in together)


def test_a_service_with_tail_drafts_off_sends_none_and_the_client_stops_asking(export_bundle):
    out = export_bundle(TINY, 2)
    client, _, head, tail = runners(out)
    plain = plain_tokens(head, tail, 24)
    with service_thread(out / "server", tail_drafts=False) as url:
        drafter = Counting(costs=FreePositions(), tail_drafts=True)
        link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams())
        try:
            assert [c.token for c in SplitGenerator(head, link, drafter=drafter).generate(PROMPT, 24)] == plain
        finally:
            link.close()
    assert drafter.sent == 0 and drafter.tail_count() == 0


def test_a_seed_gives_the_same_sampled_text_with_drafts_as_without(export_bundle):
    """Each position's random number is keyed by the seed and the position (splitcore/sampling.py), so the samples
    that rejected drafts discard do not shift the ones after them."""
    _, server, head, tail = runners(export_bundle(TINY, 2))
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=3)
    plain = [c.token for c in SplitGenerator(head, LocalTail(tail, params)).generate(PROMPT, 40)]
    drafter = Counting(costs=FreePositions(), tail_drafts=True)
    generator = SplitGenerator(head, LocalTail(tail, params, drafter=TailDrafter(server)), drafter=drafter)
    assert [c.token for c in generator.generate(PROMPT, 40)] == plain
    assert drafter.sent > drafter.kept > 0, "some drafts kept and some rejected"
    other = SamplingParams(temperature=0.8, top_p=0.95, seed=4)
    assert [c.token for c in SplitGenerator(head, LocalTail(tail, other)).generate(PROMPT, 40)] != plain


def test_a_retried_step_claims_no_drafts_and_leaves_the_kept_positions_alone(export_bundle):
    """The answer to a step that held drafts is lost and the client sends it again: the first try already drafted
    after its own last kept token, so the retry must not take those drafts for the ones it holds (the tail would
    draft after the wrong token, over positions the client keeps)."""
    out = export_bundle(TINY, 2)
    client, _, head, tail = runners(out)
    with service_thread(out / "server") as url:
        sha = client.manifest_sha256

        def conversation(retry: bool) -> list[int]:
            sid = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json={"manifest_sha256": sha}).json()["session_id"]
            cache = head.new_cache(256)
            first = step(url, sid, sha, head.forward(np.array([PROMPT]), cache), 0, Draft=3).json()
            sent = [first["token"], first["drafts"][0], (first["drafts"][1] + 1) % 512, first["drafts"][2]]
            hidden, past = head.forward(np.array([sent]), cache), len(PROMPT)
            answer = step(url, sid, sha, hidden, past, Keep_Length=past, Draft=3, Drafted=3, Sample_Count=4)
            if retry:  # the same step again, as a client does when the answer did not arrive
                again = step(url, sid, sha, hidden, past, Keep_Length=past, Draft=3, Drafted=3, Sample_Count=4)
                assert again.status_code == 200 and again.json()["drafts"] == []
                assert again.json()["tokens"] == answer.json()["tokens"]
            result = answer.json()
            kept = next(i for i in range(3) if result["tokens"][i] != sent[i + 1])
            length = past + kept + 1
            cache.truncate(0, length)
            tokens = []
            token = result["tokens"][kept]
            for _ in range(6):  # plain steps on: they read every kept position's KV
                reply = step(url, sid, sha, head.forward(np.array([[token]]), cache), length, Keep_Length=length)
                token = reply.json()["token"]
                tokens.append(token)
                length += 1
            return tokens

        assert conversation(retry=True) == conversation(retry=False)


def test_one_drafter_serves_conversations_on_several_threads(export_bundle):
    """In process, the gateway's conversations share the tail's drafter (its scratch cache and bindings)."""
    _, server, head, tail = runners(export_bundle(TINY, 2))
    drafter = TailDrafter(server)
    plain = plain_tokens(head, tail, 24)

    def run(_) -> list[int]:
        link = LocalTail(tail, SamplingParams(), drafter=drafter)
        generator = SplitGenerator(head, link, drafter=Counting(costs=FreePositions(), tail_drafts=True))
        return [c.token for c in generator.generate(PROMPT, 24)]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, range(8))) == [plain] * 8


def test_the_service_clamps_the_drafts_a_step_asks_for(export_bundle):
    out = export_bundle(TINY, 2)
    client, _, head, _ = runners(out)
    with service_thread(out / "server", max_drafts=2) as url:
        sha = client.manifest_sha256
        sid = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json={"manifest_sha256": sha}).json()["session_id"]
        answer = step(url, sid, sha, head.forward(np.array([PROMPT]), head.new_cache(64)), 0, Draft=16)
        assert answer.status_code == 200 and len(answer.json()["drafts"]) == 2
