"""Prometheus metrics of gpuscale (prefix ``gpuscale_``), defined once at import.

Provider API calls are counted here; the controller adds its own metrics to this module.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PROVIDER_REQUESTS = Counter(
    "gpuscale_provider_requests_total",
    "Provider API calls by endpoint and outcome (HTTP status, or 'error' when no answer came).",
    ["endpoint", "status"],
)
PROVIDER_REQUEST_SECONDS = Histogram(
    "gpuscale_provider_request_seconds",
    "Duration of provider API calls by endpoint.",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
