"""Prometheus metrics of the store service, on their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .store import KVStore

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _StoreCollector:
    """Reads the store's own counters at scrape time, so the store knows nothing of Prometheus."""

    def __init__(self, store: KVStore) -> None:
        self.store = store

    def collect(self):
        s = self.store.stats()
        hits = CounterMetricFamily("hack_kv_store_hits", "Gets served, by tier", labels=["tier"])
        evictions = CounterMetricFamily(
            "hack_kv_store_evictions", "Chunks evicted, by tier", labels=["tier"]
        )
        used = GaugeMetricFamily("hack_kv_store_tier_bytes", "Bytes held, by tier", labels=["tier"])
        chunks = GaugeMetricFamily(
            "hack_kv_store_tier_chunks", "Chunks held, by tier", labels=["tier"]
        )
        cap = GaugeMetricFamily(
            "hack_kv_store_tier_capacity_bytes", "Capacity, by tier", labels=["tier"]
        )
        for t in s["tiers"]:
            hits.add_metric([t["name"]], t["hits"])
            evictions.add_metric([t["name"]], t["evictions"])
            used.add_metric([t["name"]], t["bytes"])
            chunks.add_metric([t["name"]], t["chunks"])
            cap.add_metric([t["name"]], t["capacity_bytes"])
        yield from (hits, evictions, used, chunks, cap)
        yield CounterMetricFamily(
            "hack_kv_store_misses", "Gets of absent chunks", value=s["misses"]
        )
        yield CounterMetricFamily(
            "hack_kv_store_corrupt_dropped",
            "Corrupt chunk files dropped",
            value=s["corrupt_dropped"],
        )
        yield CounterMetricFamily(
            "hack_kv_store_put_failures", "Puts refused", value=s["put_failures"]
        )
        yield CounterMetricFamily(
            "hack_kv_store_spill_failures",
            "Evicted chunks that could not be spilled",
            value=s["spill_failures"],
        )


class ServiceMetrics:
    """Request counts, latencies and bytes moved, plus the store's own counters."""

    def __init__(self, store: KVStore) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        self.requests = Counter(
            "hack_kv_store_requests",
            "RPCs by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hack_kv_store_latency_seconds",
            "RPC latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "hack_kv_store_bytes_in", "Value bytes received by Put", registry=self.registry
        )
        self.bytes_out = Counter(
            "hack_kv_store_bytes_out", "Value bytes sent by Get", registry=self.registry
        )

    def track_inflight(self, read_bytes) -> None:
        """Export the bytes of puts being received now (read_bytes() at scrape time)."""
        g = Gauge(
            "hack_kv_store_inflight_put_bytes",
            "Bytes of puts being received",
            registry=self.registry,
        )
        g.set_function(read_bytes)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on `port` (0: any free port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
