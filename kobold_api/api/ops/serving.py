"""What an operator (or a load balancer) asks a replica: is it healthy, and how busy is it.

``/health`` answers 200 only when the model's worker runs and the conversation database
answers; HAProxy's active checks (``deploy/haproxy.cfg``) take a replica out on anything else.
``/metrics`` is the Prometheus text format, read from a registry this app owns (no global
state): the queue, the running rows, the KV cache in use, tokens, and histograms of the time to
first token and the decode rate. The ``vllm:`` gauges repeat three of them under the names the
Kubernetes Gateway API inference extension and similar routers read by default.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from ...engine.engine import Engine, Job
from ...engine.generation import GenerationResult
from ...settings import Settings

log = logging.getLogger(__name__)

#: Seconds from a request's arrival in the queue to its first output.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: A request's decode speed, tokens per second.
RATE_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500)


class _EngineGauges(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        waiting, running = engine.queued, engine.running
        capacity = max(1, engine.max_batch_size * engine.context_length)
        in_use = engine.stats.kv_tokens_in_use
        usage = min(1.0, in_use / capacity)
        prefix = engine.generator.prefix_cache
        info = InfoMetricFamily("kobold_api_replica", "This replica and its model.")
        info.add_metric([], {"replica": self.settings.resolved_replica_name, "model": engine.model_name})
        yield info
        for name, text, value in (
            ("kobold_api_requests_waiting", "Generations queued for a batch row.", waiting),
            ("kobold_api_requests_running", "Generations in the batch now.", running),
            ("kobold_api_batch_rows", "Rows the batch holds at most.", engine.max_batch_size),
            ("kobold_api_kv_cache_tokens", "Tokens in the running rows' KV caches.", in_use),
            ("kobold_api_kv_cache_usage_ratio", "KV cache in use, of batch rows x context length (0-1).", usage),
            ("kobold_api_prefix_cache_bytes", "Bytes of KV kept for prompt reuse.",
             prefix.total_bytes if prefix is not None else 0),
            ("vllm:num_requests_waiting", "As kobold_api_requests_waiting (for routers that read vLLM's names).",
             waiting),
            ("vllm:num_requests_running", "As kobold_api_requests_running.", running),
            ("vllm:kv_cache_usage_perc", "As kobold_api_kv_cache_usage_ratio (0-1, as vLLM reports it).", usage),
        ):
            yield GaugeMetricFamily(name, text, value=value)


class OpsService:
    """``/health`` and ``/metrics`` of one replica."""

    def __init__(self, engine: Engine, settings: Settings, ping_database: Callable[[], None]) -> None:
        self.engine = engine
        self.settings = settings
        self.ping_database = ping_database
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineGauges(engine, settings))
        self.prompt_tokens = Counter("kobold_api_prompt_tokens", "Prompt tokens read.", registry=self.registry)
        self.generated_tokens = Counter("kobold_api_generation_tokens", "Tokens generated.", registry=self.registry)
        self.finished = Counter("kobold_api_generations", "Finished generations, by why they ended.",
                                ["stop_reason"], registry=self.registry)
        self.ttft = Histogram("kobold_api_time_to_first_token_seconds",
                              "From a request's arrival in the queue to its first output.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.decode_rate = Histogram("kobold_api_decode_tokens_per_second", "Each generation's decode speed.",
                                     buckets=RATE_BUCKETS, registry=self.registry)
        engine.stats.observers.append(self._observe)

    def _observe(self, job: Job, result: GenerationResult) -> None:
        """Runs on the engine's worker for each finished generation."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generated_tokens.inc(result.completion_tokens)
        self.finished.labels(result.stop_reason).inc()
        if job.first_output_at is not None:
            self.ttft.observe(max(0.0, job.first_output_at - job.submitted_at))
        if result.completion_tokens > 1 and result.decode_seconds > 0:
            self.decode_rate.observe(result.completion_tokens / result.decode_seconds)

    def health(self) -> tuple[dict[str, Any], int]:
        """The replica's state, and 200 when it can serve (503 otherwise)."""
        started = time.monotonic()
        database = "ok"
        try:
            self.ping_database()
        except Exception as exc:  # the reason, not the URL (which may hold a password)
            log.warning("health check: the database does not answer: %s", type(exc).__name__)
            database = f"unreachable ({type(exc).__name__})"
        model_loaded = self.engine.alive
        healthy = model_loaded and database == "ok"
        body = {"status": "ok" if healthy else "unavailable", "replica": self.settings.resolved_replica_name,
                "model": self.engine.model_name, "model_loaded": model_loaded, "database": database,
                "requests_waiting": self.engine.queued, "requests_running": self.engine.running,
                "check_seconds": round(time.monotonic() - started, 4)}
        return body, 200 if healthy else 503

    def metrics(self) -> bytes:
        return generate_latest(self.registry)
