"""TinyLlama-1.1B's real shapes (22 layers, hidden 2048, GQA 32/4, untied head) with random weights.

Marked heavy: a few minutes and several GB of RAM, not part of CI. Run with `make test PYTEST_ARGS="-m heavy"`.
"""

from __future__ import annotations

import resource

import pytest
from conftest import bundles

from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.sampling import SamplingParams

pytestmark = pytest.mark.heavy


def test_tinyllama_shaped_export_validates_and_generates(export_bundle, torch_model):
    out = export_bundle("random:tinyllama", 4)
    client, server = bundles(out)
    m = client.manifest
    assert (m.model.num_layers, m.model.hidden_size, m.model.num_key_value_heads) == (22, 2048, 4)
    assert m.validation["status"] == "passed"
    loaded = torch_model("random:tinyllama")
    prompt = list(range(100, 116))
    import torch

    with torch.no_grad():
        expected = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                         eos_token_id=None)[0, len(prompt):].tolist()
    generator = SplitGenerator(HeadRunner(client), LocalTail(TailRunner(server), SamplingParams()))
    assert [c.token for c in generator.generate(prompt, 8, stop_ids=())] == expected
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of the test process: {peak_gib:.1f} GiB")
    assert peak_gib < 16, f"peak RSS {peak_gib:.1f} GiB leaves too little of a 24 GB machine"
