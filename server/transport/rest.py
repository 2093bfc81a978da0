"""The Open Inference Protocol over HTTP/REST (`/v2/...`, aiohttp) and the web page at `/`.

Thin over the same data plane as the gRPC transport (server/plane/oip.py), on a port of its own, on the
server's event loop. Tensors travel as JSON (`data`, flat or nested) or with the binary tensor data
extension (`Inference-Header-Content-Length`: a JSON header, then each binary tensor's bytes). A
request may bound its own time with `parameters.timeout` in microseconds, as in Triton; a client
that disconnects cancels its work. Errors are `{"error": "..."}` with the status code below; calls
are counted in the same Prometheus series as gRPC's, with methods named `http:<Method>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from server import tracing
from server.errors import (
    AlreadyExists,
    AuthRefused,
    Cancelled,
    DeadlineExpired,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    PermissionDenied,
    ServiceError,
    ShuttingDown,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from server.ops.metrics import ServiceMetrics
from server.ops.metrics_http import listen_sockets
from server.pipeline.table_csv import table_csv
from server.plane.data_plane import DataPlane
from server.plane.oip import Tensor, tensor_from_bytes, tensor_from_values
from server.security import TokenChecker, http_refusal, scope_of
from server.transport.guards import status_of
from server.transport.wire import new_request_ids

REQUEST_ID_HEADER = "X-Request-Id"  # ReadDigits over HTTP: the caller's id for its answer (generated when absent)
MAX_REQUEST_ID_CHARS = 128

log = logging.getLogger("mnist.rest")

WEB_PAGE = Path(__file__).resolve().parents[1] / "web" / "index.html"
HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_STATUS_OF: dict[type[ServiceError], int] = {
    InvalidInput: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    AuthRefused: 403,  # any other refusal of credentials, as gRPC's PERMISSION_DENIED (answered by http_refusal)
    NotFound: 404,
    AlreadyExists: 409,
    Overloaded: 429,
    Unsupported: 501,
    NotReady: 503,
    ShuttingDown: 503,
    Unavailable: 503,
    DeadlineExpired: 504,
    Cancelled: 499,  # nginx's "client closed request": nobody reads it, but the metrics do
}
MAX_BODY_BYTES = 16 * 1024 * 1024  # replaced by --max-message-bytes
BACKLOG = 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_status(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS_OF:
            return HTTP_STATUS_OF[cls]
    return 500


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class RestApi:
    """The `/v2` routes and the page, over one data plane; `app()` builds the aiohttp application."""

    def __init__(
        self,
        plane: DataPlane,
        metrics: ServiceMetrics,
        tokens: TokenChecker | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_read_digits: int = 64,
    ) -> None:
        self.plane = plane
        self.max_read_digits = max_read_digits
        self.metrics = metrics
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.closing = False  # shutdown began: new requests (health aside) are answered 503, running ones finish
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._guard])
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        routes = [
            ("GET", "/", self.page, "Page"),
            ("GET", "/v2/health/live", self.live, "ServerLive"),
            ("GET", "/v2/health/ready", self.ready, "ServerReady"),
            ("GET", "/v2", self.server_metadata, "ServerMetadata"),
            ("POST", "/v2/repository/index", self.repository_index, "RepositoryIndex"),
            ("POST", "/v2/repository/models/{name}/load", self.load_model, "RepositoryModelLoad"),
            ("POST", "/v2/repository/models/{name}/unload", self.unload_model, "RepositoryModelUnload"),
        ]
        for prefix, suffix in ((model, ""), (versioned, ".version")):  # route names are unique; metrics drop ".version"
            routes += [
                ("GET", prefix, self.model_metadata, "ModelMetadata" + suffix),
                ("GET", prefix + "/ready", self.model_ready, "ModelReady" + suffix),
                ("GET", prefix + "/config", self.model_config, "ModelConfig" + suffix),
                ("GET", prefix + "/stats", self.model_stats, "ModelStatistics" + suffix),
                ("POST", prefix + "/infer", self.infer, "ModelInfer" + suffix),
                ("POST", prefix + "/read", self.read, "ReadDigits" + suffix),
                ("POST", prefix + "/table", self.table, "ReadTable" + suffix),
                ("POST", prefix + "/expression", self.expression, "ReadExpression" + suffix),
            ]
        routes.append(("POST", model + "/feedback", self.feedback, "Feedback"))
        for method, path, handler, name in routes:
            app.router.add_route(method, path, handler, name=name)
        return app

    # --- every request: auth, errors, metrics ---------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request: a traced span (child of the caller's traceparent), the token check, one error format,
        and the call counted by method and code."""
        route = (request.match_info.route.name or "NotFound").partition(".")[0]
        method = f"http:{route}"
        started = time.perf_counter()
        span = None
        if tracing.enabled:
            resource = request.match_info.route.resource
            attributes = {
                "http.request.method": request.method,
                "http.route": resource.canonical if resource is not None else request.path,
                "url.path": request.path,
            }
            span = tracing.start_server_span(
                f"{request.method} {attributes['http.route']}", request.headers, attributes
            )
        code, response = "OK", None
        self.metrics.in_flight.inc()
        self.in_flight += 1
        try:
            if self.closing and not request.path.startswith("/v2/health/"):
                raise ShuttingDown("server is shutting down; retry on another replica")
            if self.tokens is not None and not request.path.startswith("/v2/health/") and route != "Page":
                self.tokens.check(request.headers.get("Authorization"), scope_of(route))
            response = await handler(request)
        except AuthRefused as err:
            code = status_of(err).name
            self.metrics.count_refusal("http", err)
            status, headers = http_refusal(err)
            response = _error(int(status), str(err), headers)
        except ServiceError as err:
            code = status_of(err).name
            retry = getattr(err, "retry_after", None)
            headers = None
            if retry is not None:
                headers = {"Retry-After": str(max(1, round(retry))), "retry-after-ms": str(max(1, round(retry * 1000)))}
            response = _error(http_status(err), str(err), headers)
        except web.HTTPException as err:
            code = "NOT_FOUND" if err.status == 404 else "INVALID_ARGUMENT" if err.status < 500 else "INTERNAL"
            if err.status == 405:
                # only Allow: the exception's own headers carry its text/plain Content-Type, which json_response refuses
                allow = {"Allow": err.headers["Allow"]}
                response = _error(405, f"{request.method} is not allowed on {request.path}", allow)
            elif err.status == 413:
                response = _error(413, f"request body over the limit of {self.max_body_bytes:,} bytes")
            else:
                response = _error(err.status, err.reason if err.status != 404 else f"no such endpoint: {request.path}")
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("%s %s failed", request.method, request.path)
            response = _error(500, f"internal error in {route}; see the server log")
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(method, code).inc()
            self.metrics.request_latency.labels(method, code).observe(time.perf_counter() - started)
            if span is not None:
                status = response.status if response is not None else HTTP_STATUS_OF[Cancelled]
                span.set_attribute("http.response.status_code", status)
                if status >= 400:
                    span.fail(f"{status} {code}")
                span.end()
        return response

    async def drain(self, grace: float) -> None:
        """Shutdown, as gRPC's: new requests get 503 while the listener stays open; running ones get `grace`."""
        self.closing = True
        if self.in_flight:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)

    # --- health and metadata ----------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_PAGE, headers={"Cache-Control": "no-cache"})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.plane.ready() and not self.closing
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.plane.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.plane.model_metadata(*_model(request)))

    async def model_ready(self, request: web.Request) -> web.Response:
        ready = self.plane.model_ready(*_model(request))
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.plane.model_config(*_model(request)))

    async def model_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"model_stats": self.plane.statistics(*_model(request))})

    async def repository_index(self, request: web.Request) -> web.Response:
        return web.json_response(self.plane.repository_index())

    async def load_model(self, request: web.Request) -> web.Response:
        await self.plane.load_model(request.match_info["name"])
        return web.json_response({})

    async def unload_model(self, request: web.Request) -> web.Response:
        await self.plane.unload_model(request.match_info["name"])
        return web.json_response({})

    # --- inference ----------------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        self.plane.served(name, version)  # an unknown model is 404, whatever else is wrong
        body = await request.read()
        header, inputs = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
        if not isinstance(header.get("id", ""), str):
            raise InvalidInput('"id" must be a string')
        deadline = _deadline(header.get("parameters"))
        wanted, binary = requested_outputs(header)
        name, model_version, outputs = await self.plane.infer(name, version, inputs, wanted, deadline)
        return infer_response(header.get("id"), name, model_version, outputs, binary)

    async def read(self, request: web.Request) -> web.Response:
        """ReadDigits over HTTP (this server's own extension): the body is the image file; ?expected_digits=N."""
        name, version = _model(request)
        expected = request.query.get("expected_digits", "0")
        if not expected.isascii() or not expected.isdigit() or int(expected) > self.max_read_digits:
            raise InvalidInput(f"expected_digits must be a whole number from 0 to {self.max_read_digits}")
        body, deadline = await self._image_body(request, name, version, "the digits")
        served, reading, (width, height) = await self.plane.read_digits(name, version, body, int(expected), deadline)
        request_id = request.headers.get(REQUEST_ID_HEADER, "")[:MAX_REQUEST_ID_CHARS] or new_request_ids(1)[0]
        self.plane.remember_reading(served, request_id, reading)
        return web.json_response(
            {
                "model_name": served.name,
                "model_version": served.version,
                "request_id": request_id,
                "text": reading.text,
                "confidence": reading.confidence,
                "image_width": width,
                "image_height": height,
                "digits": [_digit_json(d) for d in reading.digits],
            }
        )

    async def feedback(self, request: web.Request) -> web.Response:
        """The true label of an earlier answer: JSON {"request_id": ..., "label": 0-9} (Classify) or
        {"request_id": ..., "text": "2026"} (ReadDigits), as mnist.v1's Feedback."""
        try:
            body = await request.json()
        except ValueError:
            raise InvalidInput('the body must be JSON: {"request_id": "...", "label": 7}') from None
        if not isinstance(body, dict):
            raise InvalidInput('the body must be a JSON object: {"request_id": "...", "label": 7}')
        request_id, label, text = body.get("request_id"), body.get("label"), body.get("text")
        if not isinstance(request_id, str):
            raise InvalidInput('"request_id" must be a string: the id of an earlier answer')
        if (label is None) == (text is None):
            raise InvalidInput('send one of "label" (the true digit, 0-9) and "text" (the true number)')
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
            raise InvalidInput('"label" must be a whole number from 0 to 9')
        if text is not None and not isinstance(text, str):
            raise InvalidInput('"text" must be a string of digits')
        result = await self.plane.feedback_for(
            request_id, label, text, request.match_info["name"], authorization=request.headers.get("Authorization")
        )
        return web.json_response(
            {
                "model_name": result.answer.model,
                "model_version": result.answer.version,
                "prediction": result.answer.prediction,
                "label": result.label,
                "correct": result.correct,
                "stored": result.stored,
                "live_accuracy": None if result.live_accuracy != result.live_accuracy else result.live_accuracy,
                "live_answers": result.live_answers,
            }
        )

    async def table(self, request: web.Request) -> web.Response:
        """ReadTable over HTTP: the body is the image file; JSON rows of cells, or ?format=csv for the cells' text."""
        name, version = _model(request)
        body, deadline = await self._image_body(request, name, version, "the table")  # an unknown model first: 404
        wanted = request.query.get("format", "json")
        if wanted not in ("json", "csv"):
            raise InvalidInput(f"format must be json or csv, not {wanted!r}")
        served, table, (width, height) = await self.plane.read_table(name, version, body, deadline)
        if wanted == "csv":
            return web.Response(
                text=table_csv([[cell.text for cell in row] for row in table.rows]), content_type="text/csv"
            )
        return web.json_response(
            {
                "model_name": served.name,
                "model_version": served.version,
                "rows": [
                    [
                        {
                            "text": cell.text,
                            "confidence": cell.confidence,
                            "box": _box_json(cell.box),
                            "digits": [_digit_json(d) for d in cell.digits],
                        }
                        for cell in row
                    ]
                    for row in table.rows
                ],
                "columns": table.columns,
                "ruled_rows": table.ruled_rows,
                "ruled_columns": table.ruled_columns,
                "skew_degrees": table.skew_degrees,
                "confidence": table.confidence,
                "image_width": width,
                "image_height": height,
            }
        )

    async def expression(self, request: web.Request) -> web.Response:
        """ReadExpression over HTTP: the body is the image file; the expression, its symbols and its exact value."""
        name, version = _model(request)
        body, deadline = await self._image_body(request, name, version, "the expression")
        served, expression, (width, height) = await self.plane.read_expression(name, version, body, deadline)
        evaluation = expression.evaluation
        return web.json_response(
            {
                "model_name": served.name,
                "model_version": served.version,
                "text": expression.text,
                "value": evaluation.value,
                "error": evaluation.error,
                "written_answer": evaluation.written_answer,
                "answer_correct": evaluation.answer_correct,
                "confidence": expression.confidence,
                "image_width": width,
                "image_height": height,
                "symbols": [
                    {
                        "symbol": s.symbol,
                        "confidence": s.confidence,
                        "box": _box_json(s.box),
                        "alternatives": [{"symbol": a, "probability": q} for a, q in s.alternatives],
                    }
                    for s in expression.symbols
                ],
            }
        )

    async def _image_body(
        self, request: web.Request, name: str, version: str, holding: str
    ) -> tuple[bytes, float | None]:
        """The image file a Read* call sends as its body, and the deadline its ?timeout= (microseconds) sets."""
        self.plane.served(name, version)  # an unknown model is 404, whatever else is wrong
        body = await request.read()
        if not body:
            raise InvalidInput(f"no image: send the image file (PNG, JPEG, ...) holding {holding} as the request body")
        timeout = request.query.get("timeout")  # microseconds, as the infer request's parameter
        return body, _deadline({"timeout": _number(timeout)}) if timeout is not None else None


def _box_json(box: tuple[int, int, int, int]) -> dict[str, int]:
    return {"x": box[0], "y": box[1], "width": box[2], "height": box[3]}


def _digit_json(d: Any) -> dict[str, Any]:
    return {
        "digit": d.digit,
        "confidence": d.confidence,
        "box": _box_json(d.box),
        "alternatives": [{"digit": a, "probability": q} for a, q in d.alternatives],
        "line": d.line,
        "group": d.group,
    }


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInput(f"timeout must be a number of microseconds, not {text!r}") from None


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _deadline(parameters: Any) -> float | None:
    """Triton's `timeout` request parameter (microseconds) as a time.monotonic() deadline."""
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    if "timeout" not in parameters:
        return None
    timeout = parameters["timeout"]
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidInput(f"parameters.timeout must be a positive number of microseconds, not {timeout!r}")
    return time.monotonic() + timeout / 1e6


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[dict, list[Tensor]]:
    """The JSON header and the input tensors of an infer request, JSON-only or with binary tensor data."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be a whole number, not {header_length!r}") from None
        if not 0 < length <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
        json_part, binary = body[:length], body[length:]
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidInput(f"the request body is not JSON: {err}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput('the request must be a JSON object with an "inputs" list')
    tensors, at = [], 0
    for i, entry in enumerate(header["inputs"]):
        if not isinstance(entry, dict):
            raise InvalidInput(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name, datatype, shape = entry.get("name", ""), entry.get("datatype", ""), entry.get("shape")
        if not isinstance(shape, list):
            raise InvalidInput(f"input '{name}': shape must be a list of whole numbers")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput(f"input '{name}': parameters must be an object")
        if "shared_memory_region" in parameters:
            raise Unsupported("shared-memory tensors are not supported by this server; send the data in the request")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(binary):
                raise InvalidInput(f"input '{name}': binary_data_size {size!r} runs past the end of the body")
            tensors.append(tensor_from_bytes(name, datatype, shape, binary[at : at + size]))
            at += size
        elif "data" in entry:
            tensors.append(tensor_from_values(name, datatype, shape, entry["data"]))
        else:
            raise InvalidInput(f"input '{name}' has neither data nor binary_data_size")
    if at != len(binary):
        raise InvalidInput(f"{len(binary) - at} bytes of binary data after the last input's")
    return header, tensors


def requested_outputs(header: dict) -> tuple[list[str], set[str] | bool]:
    """The outputs asked for (empty: all) and which travel as binary (True: all of them)."""
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    everything_binary = _flag(parameters, "binary_data_output")
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise InvalidInput('"outputs" must be a list of objects with a name')
    for output in outputs:
        if not isinstance(output.get("parameters") or {}, dict):
            raise InvalidInput(f"output {output['name']!r}: parameters must be an object")
    binary = {o["name"] for o in outputs if _flag(o.get("parameters") or {}, "binary_data", everything_binary)}
    return [o["name"] for o in outputs], (everything_binary if not outputs else binary)


def _flag(parameters: dict, key: str, default: bool = False) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {key!r} must be true or false, not {value!r}")
    return value


def infer_response(
    request_id: Any, name: str, version: str, outputs: list[Tensor], binary: set[str] | bool
) -> web.Response:
    entries, blobs = [], []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary is True or (binary and tensor.name in binary):
            blob = np.ascontiguousarray(tensor.data).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.data.reshape(-1).tolist()
        entries.append(entry)
    header: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": entries}
    if request_id is not None:
        header["id"] = request_id
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(
        body=text + b"".join(blobs),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )


class RestServer:
    """The REST API on its own port, on the running event loop."""

    def __init__(
        self,
        api: RestApi,
        host: str,
        port: int,
        ssl_context: Any = None,
        grace: float = 10.0,
        reuse_port: bool = False,
    ) -> None:
        self.api = api
        self.reuse_port = reuse_port  # a worker of several on one port (server/supervisor.py)
        self.grace = grace
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._runner = web.AppRunner(
            self.api.app(), handler_cancellation=True, access_log=None, shutdown_timeout=self.grace
        )
        await self._runner.setup()
        # Bound here as /metrics binds ("[::]": one dual-stack socket, IPv6 and IPv4), then handed to aiohttp.
        for sock in listen_sockets(self.host, self.port, BACKLOG, "the REST API", self.reuse_port):
            await web.SockSite(self._runner, sock, ssl_context=self.ssl_context, backlog=BACKLOG).start()
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening, let running requests finish within the grace, then close."""
        self.api.closing = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
