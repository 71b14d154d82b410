"""Serve ``asgi_app`` behind LoopguardMiddleware, metrics exported to Prometheus.

Usage: ``python prom_server.py APP_PORT METRICS_PORT [SHED_DELAY_P99]``. The metrics
are served by the SDK's Prometheus reader on METRICS_PORT, as under
``opentelemetry-instrument`` with ``OTEL_METRICS_EXPORTER=prometheus``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server

sys.path.insert(0, str(Path(__file__).parent))

from asgi_app import make_app
from loopguard_integrations.asgi import LoopguardMiddleware

import loopguard


def main() -> None:
    port, metrics_port = int(sys.argv[1]), int(sys.argv[2])
    shed = float(sys.argv[3]) if len(sys.argv) > 3 else None
    start_http_server(metrics_port, addr="127.0.0.1")
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    loopguard.install(threshold=0.1, log=False, stats=True, blocking="record")
    app = LoopguardMiddleware(make_app(), shed_delay_p99=shed, shed_window=1.0)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio")


if __name__ == "__main__":
    main()
