"""The real offline default, SmolLM2-135M-Instruct split at K=4: tokens and text equal transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bundles, requires_smollm2
from servers import service_thread

from client.tokenizer import ChatTokenizer
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.sampling import SamplingParams

pytestmark = [pytest.mark.slow, requires_smollm2]
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France? Answer in one sentence."
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def smollm2(export_bundle, torch_model):
    return export_bundle("smollm2", 4), torch_model("smollm2")


def test_client_chat_template_equals_transformers(smollm2):
    out, loaded = smollm2
    client, _ = bundles(out)
    ours = ChatTokenizer(client)
    for messages in (MESSAGES, [{"role": "system", "content": "Be brief."}, *MESSAGES]):
        expected = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ours.chat_ids(messages) == list(expected)
    assert ours.stop_ids == [loaded.tokenizer.eos_token_id]


def test_greedy_32_tokens_equal_transformers_generate(smollm2):
    out, loaded = smollm2
    client, server = bundles(out)
    prompt = ChatTokenizer(client).chat_ids(MESSAGES)
    with torch.no_grad():
        reference = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                          do_sample=False)[0, len(prompt):].tolist()
    generator = SplitGenerator(HeadRunner(client), LocalTail(TailRunner(server), SamplingParams()))
    ours = [c.token for c in generator.generate(prompt, 32, stop_ids=())]
    # min_new_tokens masks EOS in transformers; compare up to the first EOS, which both produce at the same place.
    eos = client.manifest.tokenizer.eos_token_ids
    cut = next((i for i, t in enumerate(ours) if t in eos), len(ours))
    assert ours[:cut] == reference[:cut]
    assert cut >= 5, f"the answer should not stop at once: {ours}"


@pytest.fixture(scope="module")
def expected_text(smollm2) -> str:
    _, loaded = smollm2
    prompt = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        generated = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)
    return loaded.tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True)


def run_client(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "client", "--max-new-tokens", "48", *args, PROMPT],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_local_client_prints_what_transformers_generates(smollm2, expected_text):
    out, _ = smollm2
    assert run_client("--local", "--bundle", str(out)) == expected_text + "\n"
    assert "Paris" in expected_text


def test_client_over_http_prints_what_transformers_generates(smollm2, expected_text):
    out, _ = smollm2
    with service_thread(out / "server") as url:
        assert run_client("--bundle", str(out), "--server-url", url) == expected_text + "\n"


def test_int4_mlp_export_passes_its_quality_floors_and_still_answers(export_bundle):
    """The 4-bit bundle users run for speed: gated on held-out perplexity and greedy agreement at export."""
    out = export_bundle("smollm2", 4, "int4-mlp")
    client, _ = bundles(out)
    validation = client.manifest.validation
    floors = validation["quality_floors"]
    assert floors["gated"] and floors["scheme"] == "int4-mlp"
    assert floors["perplexity_ratio"] <= floors["max_perplexity_ratio"]
    assert validation["quality"]["greedy_agreement"] >= floors["min_greedy_agreement"]
    assert "Paris" in run_client("--local", "--bundle", str(out))
