"""Real OTLP receivers for tests, on 127.0.0.1 only.

``OtlpReceiver`` runs a grpcio server with the opentelemetry-proto TraceService and
MetricsService, and an HTTP server accepting ``POST /v1/traces`` and ``/v1/metrics`` with
protobuf bodies (what the SDK's ``http/protobuf`` exporters send). Every request is decoded
with the proto classes and kept; helpers flatten them into spans and metrics.

``HangingCollector`` accepts TCP connections and never answers (a collector that is stuck).

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint}   # or .http_endpoint
        ...
        receiver.wait_for(lambda r: "asyncdiag.findings" in r.metric_names(), timeout=10)
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc


class OtlpReceiver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.trace_requests: list[tpb.ExportTraceServiceRequest] = []
        self.metric_requests: list[mpb.ExportMetricsServiceRequest] = []
        self.raw: list[bytes] = []  # every body as received, for "never contains X" checks
        self.transports: set[str] = set()
        self.headers: list[dict[str, str]] = []  # request metadata / HTTP headers, lower-case
        receiver = self

        class Traces(tgrpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._keep("grpc", request, request.SerializeToString(),
                               dict(context.invocation_metadata()))
                return tpb.ExportTraceServiceResponse()

        class Metrics(mgrpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._keep("grpc", request, request.SerializeToString(),
                               dict(context.invocation_metadata()))
                return mpb.ExportMetricsServiceResponse()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        tgrpc.add_TraceServiceServicer_to_server(Traces(), self._grpc)
        mgrpc.add_MetricsServiceServicer_to_server(Metrics(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                kinds = {"/v1/traces": (tpb.ExportTraceServiceRequest,
                                        tpb.ExportTraceServiceResponse),
                         "/v1/metrics": (mpb.ExportMetricsServiceRequest,
                                         mpb.ExportMetricsServiceResponse)}
                if self.path not in kinds:
                    self.send_error(404)
                    return
                request_cls, response_cls = kinds[self.path]
                receiver._keep("http", request_cls.FromString(body), body,
                               dict(self.headers.items()))
                payload = response_cls().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    grpc_endpoint = property(lambda self: f"http://127.0.0.1:{self.grpc_port}")
    http_endpoint = property(lambda self: f"http://127.0.0.1:{self.http_port}")

    def _keep(self, transport: str, request: Any, body: bytes, headers: dict[str, str]) -> None:
        with self.lock:
            self.transports.add(transport)
            self.headers.append({k.lower(): v for k, v in headers.items()})
            self.raw.append(body)
            if isinstance(request, tpb.ExportTraceServiceRequest):
                self.trace_requests.append(request)
            else:
                self.metric_requests.append(request)

    def __enter__(self) -> OtlpReceiver:
        self._grpc.start()
        self._http_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()

    # -- views of what arrived --------------------------------------------------------------
    def spans(self) -> list[Any]:
        with self.lock:
            return [span for request in self.trace_requests
                    for resource_spans in request.resource_spans
                    for scope_spans in resource_spans.scope_spans
                    for span in scope_spans.spans]

    def resources(self) -> list[dict[str, Any]]:
        with self.lock:
            found = [rs.resource for r in self.trace_requests for rs in r.resource_spans]
            found += [rm.resource for r in self.metric_requests for rm in r.resource_metrics]
        return [attributes(resource.attributes) for resource in found]

    def metrics(self) -> Iterator[tuple[str, Any]]:
        """(scope name, Metric) for every metric of every request, oldest first."""
        with self.lock:
            requests = list(self.metric_requests)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        yield scope_metrics.scope.name, metric

    def metric_names(self) -> set[str]:
        return {metric.name for _, metric in self.metrics()}

    def latest(self, name: str) -> Any:
        """The most recent Metric called ``name`` (cumulative: it holds everything so far).

        By the points' timestamps, not arrival order: the gRPC server handles requests on
        several threads."""
        found = [metric for _, metric in self.metrics() if metric.name == name]
        return max(found, key=lambda m: max((p.time_unix_nano for p in data_points(m)),
                                            default=0), default=None)

    def wait_for(self, predicate: Callable[[OtlpReceiver], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)


def attributes(key_values: Any) -> dict[str, Any]:
    """OTLP KeyValue list -> plain dict."""
    result: dict[str, Any] = {}
    for kv in key_values:
        which = kv.value.WhichOneof("value")
        result[kv.key] = getattr(kv.value, which) if which else None
    return result


def data_points(metric: Any) -> list[Any]:
    kind = metric.WhichOneof("data")
    return list(getattr(metric, kind).data_points) if kind else []


class HangingCollector:
    """Listens on 127.0.0.1, accepts every connection, reads nothing, answers nothing."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    endpoint = property(lambda self: f"http://127.0.0.1:{self.port}")

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._accepted.append(conn)

    @property
    def connections(self) -> int:
        return len(self._accepted)

    def __enter__(self) -> HangingCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._accepted:
            conn.close()
        self._sock.close()


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
