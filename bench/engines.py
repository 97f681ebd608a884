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
    graph: str  # which bundle the configuration needs: "full", "split", "split-int8" or "torch"

    def unavailable(self) -> str | None:
        """Why this configuration cannot run here, or None."""
        if self.key == "d":
            missing = [m for m in ("services", "client.remote") if not _importable(m)]
            if missing:
                return (f"skipped: the HTTP service is not in this checkout ({', '.join(missing)} not importable); "
                        "wire it in bench/engines.py:HttpSplit")
        return None


CONFIGS = {
    c.key: c
    for c in (
        Config("a", "(a) transformers fp32", "transformers generate(), PyTorch fp32, the whole model", "torch"),
        Config("b", "(b) ONNX, one graph", "the whole model as one ONNX graph in one onnxruntime session", "full"),
        Config("c", "(c) split, in process", "head + tail graphs in one process (SplitGenerator + LocalTail)",
               "split"),
        Config("c8", "(c8) split, int8 head", "as (c) with the int8 dynamically quantized head", "split-int8"),
        Config("d", "(d) split over HTTP", "client and tail service in separate processes on loopback", "split"),
    )
}


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
        cache = self.runner.new_cache()
        chunk = np.asarray([ids], dtype=np.int64)
        for _ in range(new_tokens):
            past, total = cache.length, cache.length + chunk.shape[1]
            mask = np.ones((1, total), dtype=np.int64)
            positions = np.arange(past, total, dtype=np.int64)[None, :]
            logits = self.runner.forward(chunk, mask, positions, cache, logits_to_keep=1)
            token = int(np.argmax(logits[0, -1]))
            on_token(token)
            chunk = np.asarray([[token]], dtype=np.int64)


class LocalSplit(_Base):
    """Head and tail graphs in this process, through the same generator the client uses."""

    def __init__(self, bundle: Path) -> None:
        self.head = HeadRunner(load_bundle(bundle / "client", "client"), ["CPUExecutionProvider"])
        self.tail_runner = TailRunner(load_bundle(bundle / "server", "server"), ["CPUExecutionProvider"])

    def generate(self, ids: Sequence[int], new_tokens: int, on_token: OnToken) -> None:
        generator = SplitGenerator(self.head, LocalTail(self.tail_runner, SamplingParams()))
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
        generator = SplitGenerator(self.head, self.last_tail)
        for choice in generator.generate(list(ids), new_tokens, stop_ids=()):
            on_token(choice.token)

    def processes(self) -> dict[str, int]:
        return {"client": os.getpid(), "service": self.service.pid}

    def traffic(self) -> dict[str, int] | None:
        return self.tails.traffic()

    def close(self) -> None:
        self.service.stop()


def build(key: str, bundle: Path, int8_bundle: Path | None, model: str, seed: int) -> Engine:
    if key == "a":
        return TransformersGenerate(model, seed)
    if key == "b":
        return OnnxFull(bundle)
    if key == "c":
        return LocalSplit(bundle)
    if key == "c8":
        if int8_bundle is None:
            raise ValueError("config c8 needs an int8 bundle")
        return LocalSplit(int8_bundle)
    if key == "d":
        return HttpSplit(bundle)
    raise ValueError(f"unknown configuration {key!r}; choose from {sorted(CONFIGS)}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
