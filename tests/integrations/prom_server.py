"""``asgi_app`` behind LoopguardMiddleware, its metrics exported to Prometheus.

Two ways to run it, both with the OpenTelemetry SDK's Prometheus exporter:

* zero-code, as users do: ``opentelemetry-instrument uvicorn --app-dir DIR
  prom_server:app`` with ``OTEL_METRICS_EXPORTER=prometheus`` and the
  ``OTEL_PYTHON_LOOPGUARD_*`` options (loopguard's instrumentor turns it on);
* where loopguard is not installed with its entry points:
  ``python prom_server.py APP_PORT METRICS_PORT``, which sets up the same SDK reader
  and calls ``loopguard.install()`` itself.

``SHED_DELAY_P99`` (environment) is the middleware's ``shed_delay_p99``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from asgi_app import make_app
from loopguard_integrations.asgi import LoopguardMiddleware

import loopguard

_shed = os.environ.get("SHED_DELAY_P99")
app = LoopguardMiddleware(
    make_app(), shed_delay_p99=float(_shed) if _shed else None, shed_window=1.0
)


def main() -> None:
    import uvicorn
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    port, metrics_port = int(sys.argv[1]), int(sys.argv[2])
    start_http_server(metrics_port, addr="127.0.0.1")
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    loopguard.install(threshold=0.1, log=False, stats=True, blocking="record")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio")


if __name__ == "__main__":
    main()
