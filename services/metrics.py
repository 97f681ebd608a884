"""Prometheus metrics of one service instance, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("split_active_sessions", "Open sessions", registry=self.registry)
        self.kv_reserved = Gauge("split_kv_reserved_bytes", "KV bytes held by the slots of open sessions",
                                 registry=self.registry)
        self.slots = Gauge("split_kv_slots", "KV slots reserved at start-up (sessions open at once)",
                           registry=self.registry)
        self.kv_used = Gauge("split_kv_used_bytes", "KV bytes held by open sessions", registry=self.registry)
        self.positions = Counter("split_positions_processed", "Positions run through the tail",
                                 registry=self.registry)
        self.tokens = Counter("split_tokens_sampled", "Tokens sampled and returned", registry=self.registry)
        self.drafts = Counter("split_tail_drafts", "Tokens the tail drafted for clients (splitcore/tail_drafts.py)",
                              registry=self.registry)
        self.steps = Histogram(
            "split_step_seconds", "Tail step latency (graph run + sampling)", registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
        )
        self.batch_size = Histogram(
            "split_decode_batch_size", "Decode steps of different sessions sharing one tail run",
            registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.errors = Counter("split_errors", "Error responses by status code", ["code"], registry=self.registry)
        self.rejected = Counter("split_sessions_rejected", "Sessions refused for lack of room",
                                registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
