"""KEDA external scaler: demand for a backend pool from the gateways' time-to-first-token.

KEDA asks over gRPC (``externalscaler.proto``) whether a pool is active and for its metric; the
metric is the pool's *TTFT demand* in milliseconds, compared by KEDA's HPA (``metricType:
Value``) with the SLO as target. The inputs come from every gateway replica: scraped from their
``/metrics`` (``sources.ScrapeSource``) or asked of Prometheus (``sources.PromSource``). Nothing
here imports the gateway.
"""
