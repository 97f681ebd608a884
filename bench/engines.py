"""The configurations under test, each behind one small interface: greedy-generate exactly N tokens.

Every engine ignores EOS so all configurations generate the same number of tokens, and calls ``on_token`` the
moment each token is known, which is where the timing harness reads the clock. Engines are built inside a worker
process (``bench.worker``), one process tree per configuration, so peak RSS is per configuration.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import FullRunner, HeadRunner, TailRunner
from splitcore.manifest import load_bundle
from splitcore.sampling import SamplingParams

OnToken = Callable[[int], None]


class Engine(Protocol):
    def generate(self, ids: Sequence[int], new_tokens: int, on_token: OnToken) -> None: ...

    def processes(self) -> dict[str, int]:
        """Role -> pid of every process that holds this configuration's model (for peak RSS)."""
        ...

    def traffic(self) -> dict[str, int] | None:
        """Bytes sent and received so far, for networked configurations; None otherwise."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    description: str
    weighted: bool  # runs once per weight scheme of our exports (b, c, d); otherwise has weights of its own
    weights: str = ""  # the weights of an unweighted configuration, for the tables

    def unavailable(self) -> str | None:
        """Why this configuration cannot run here, or None (the anchors' reasons come from ``bench.anchors``)."""
        if self.key == "d":
            missing = [m for m in ("services", "client.remote") if not _importable(m)]
            if missing:
                return (f"skipped: the HTTP service is not in this checkout ({', '.join(missing)} not importable); "
                        "wire it in bench/engines.py:HttpSplit")
        return None


CONFIGS = {
    c.key: c
    for c in (
        Config("a", "(a) transformers", "transformers generate(), PyTorch fp32, the whole model", False, "fp32"),
        Config("b", "(b) ONNX, one graph", "the whole model as one ONNX graph in one onnxruntime session", True),
        Config("c", "(c) split, in process", "head + tail graphs in one process (SplitGenerator + LocalTail)", True),
        Config("d", "(d) split over HTTP", "client and tail service in separate processes on loopback", True),
        Config("llama.cpp", "llama.cpp", "llama-cpp-python on the GGUF the smollm2 export reads", False, "Q4_1"),
        Config("genai", "onnxruntime-genai", "onnxruntime-genai, its model builder -p int4 -e cpu on the same "
               "checkpoint", False, "int4"),
    )
}
ANCHORS = ("llama.cpp", "genai")


def run_key(config: str, weights: str) -> str:
    """One measured configuration: ``c@int4-mlp``; the unweighted ones keep their own key."""
    return f"{config}@{weights}" if CONFIGS[config].weighted else config


def run_label(config: str, weights: str) -> str:
    return f"{CONFIGS[config].label}, {weights or CONFIGS[config].weights}"


class _Base:
    def processes(self) -> dict[str, int]:
        return {"process": os.getpid()}

    def traffic(self) -> dict[str, int] | None:
        return None

    def close(self) -> None:
        pass


class TransformersGenerate(_Base):
    """What the original demo stack does: ``model.generate`` with the transformers KV cache."""

    def __init__(self, model: str, seed: int) -> None:
        import torch
        from transformers import GenerationConfig

        from export.sources import load_model

        self.torch = torch
        self.model = load_model(model, seed=seed).model
        self.generation_config = GenerationConfig

    def generate(self, ids: Sequence[int], new_tokens: int, on_token: OnToken) -> None:
        streamer = _Streamer(on_token)
        input_ids = self.torch.tensor([list(ids)], dtype=self.torch.int64)
        # eos None: run to max_new_tokens like every other configuration (suppressing EOS would change tokens).
        config = self.generation_config(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=new_tokens)
        with self.torch.no_grad():
            self.model.generate(input_ids, attention_mask=self.torch.ones_like(input_ids), generation_config=config,
                                streamer=streamer)


class _Streamer:
    """transformers calls ``put`` with the prompt first, then with each new token as it is chosen."""

    def __init__(self, on_token: OnToken) -> None:
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


class OnnxFull(_Base):
    """The unsplit graph in one session: the local ceiling the split is measured against."""

    def __init__(self, bundle: Path) -> None:
        self.runner = FullRunner(load_bundle(bundle / "full", "full"), ["CPUExecutionProvider"])

    def generate(self, ids: Sequence[int], new_tokens: int, on_token: OnToken) -> None:
        cache = self.runner.new_cache(len(ids) + new_tokens)
        chunk = np.asarray([ids], dtype=np.int64)
        for _ in range(new_tokens):
            logits = self.runner.forward(chunk, cache, logits_to_keep=1)
            token = int(np.argmax(logits[0, -1]))
            on_token(token)
            chunk = np.asarray([[token]], dtype=np.int64)


class LocalSplit(_Base):
    """Head and tail graphs in this process, through the same generator the client uses."""

    def __init__(self, bundle: Path) -> None:
        self.head = HeadRunner(load_bundle(bundle / "client", "client"), ["CPUExecutionProvider"])
        self.tail_runner = TailRunner(load_bundle(bundle / "server", "server"), ["CPUExecutionProvider"])

    def generate(self, ids: Sequence[int], new_tokens: int, on_token: OnToken) -> None:
        # KV reserved for this run's positions, as the client reserves them (not the model's whole context).
        length = len(ids) + new_tokens
        generator = SplitGenerator(self.head, LocalTail(self.tail_runner, SamplingParams(), max_length=length),
                                   max_length=length)
        for choice in generator.generate(list(ids), new_tokens, stop_ids=()):
            on_token(choice.token)


class HttpSplit(_Base):
    """Config (d): the client here, the tail service in a child process on a loopback port.

    Wiring (for the author of services/ and client/remote.py): start the service on the server bundle, wait until
    it answers, then run the same SplitGenerator as (c) with ``RemoteTail`` as its tail link.
    """

    def __init__(self, bundle: Path) -> None:
        from bench.http_service import RemoteTailFactory, start_service

        self.service = start_service(bundle / "server")
        self.head = HeadRunner(load_bundle(bundle / "client", "client"), ["CPUExecutionProvider"])
        self.tails = RemoteTailFactory(bundle / "client", self.service.url)
        self.last_tail = None

    def generate(self, ids: Sequence[int], new_tokens: int, on_token: OnToken) -> None:
        self.last_tail = self.tails.open(SamplingParams())
        generator = SplitGenerator(self.head, self.last_tail, max_length=len(ids) + new_tokens)
        for choice in generator.generate(list(ids), new_tokens, stop_ids=()):
            on_token(choice.token)

    def processes(self) -> dict[str, int]:
        return {"client": os.getpid(), "service": self.service.pid}

    def traffic(self) -> dict[str, int] | None:
        return self.tails.traffic()

    def close(self) -> None:
        self.service.stop()


class LlamaCpp(_Base):
    """llama-cpp-python's own generate loop (greedy sampler, no EOS stop), every core for prompt and decode."""

    def __init__(self, gguf: Path, context: int = 2048) -> None:
        from llama_cpp import Llama

        threads = os.cpu_count() or 1
        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def generate(self, ids: Sequence[int], new_tokens: int, on_token: OnToken) -> None:
        self.llm.reset()  # no prefix reuse from the previous run: every run prefills its whole prompt
        for count, token in enumerate(self.llm.generate(list(ids), temp=0.0, top_k=1, reset=True), start=1):
            on_token(int(token))
            if count == new_tokens:
                break


class GenaiInt4(_Base):
    """onnxruntime-genai's Generator on the model its builder wrote; ``min_length`` keeps it past EOS."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))

    def generate(self, ids: Sequence[int], new_tokens: int, on_token: OnToken) -> None:
        params = self.og.GeneratorParams(self.model)
        total = len(ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(list(ids))
        for _ in range(new_tokens):
            generator.generate_next_token()
            on_token(int(generator.get_next_tokens()[0]))


def build(key: str, path: Path, model: str, seed: int) -> Engine:
    """``path``: the export directory for a, b, c, d; the GGUF for llama.cpp; the builder's output for genai."""
    engines = {"a": lambda: TransformersGenerate(model, seed), "b": lambda: OnnxFull(path),
               "c": lambda: LocalSplit(path), "d": lambda: HttpSplit(path), "llama.cpp": lambda: LlamaCpp(path),
               "genai": lambda: GenaiInt4(path)}
    if key not in engines:
        raise ValueError(f"unknown configuration {key!r}; choose from {sorted(CONFIGS)}")
    return engines[key]()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
