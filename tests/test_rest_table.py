"""server.transport.rest: each domain error has one HTTP status, and a real server answers it with that status, a JSON
`{"error": message}` body and, when the error carries a retry hint, Retry-After; an unexpected exception is a 500 with
a generic message and the server goes on serving.

The errors the protocol itself produces (a bad body, an unknown model or route, a wrong method, a body over the limit,
model control switched off) are provoked for real; the others (overload, deadline, not ready, ...) are raised by a
fault injected into the data plane's `infer`, under the real middleware, router and HTTP server.
"""

from __future__ import annotations

import inspect
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

import server.errors
from server.app import MnistServer
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
from server.transport.rest import http_status
from tests.support import Harness, free_port, test_config

DOCUMENTED = {
    InvalidInput: 400,
    Unauthenticated: 401,
    AuthRefused: 403,  # the base of the two auth refusals; raised only as one of them
    PermissionDenied: 403,
    NotFound: 404,
    Overloaded: 429,
    Cancelled: 499,  # nginx's "client closed request": for the metrics, nobody is left to read it
    Unsupported: 501,
    AlreadyExists: 409,
    NotReady: 503,
    ShuttingDown: 503,
    Unavailable: 503,  # another worker or replica that may hold the answer did not reply in time
    DeadlineExpired: 504,
}
MAX_BODY = 64 * 1024
MODEL = "null"
INFER = f"/v2/models/{MODEL}/infer"
DIGIT = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 783 + [255]}]}


# --- the table ------------------------------------------------------------------------------------------------


def test_every_error_class_maps_to_its_documented_http_status() -> None:
    classes = {
        cls
        for _, cls in inspect.getmembers(server.errors, inspect.isclass)
        if issubclass(cls, ServiceError) and cls is not ServiceError
    }
    assert classes == set(DOCUMENTED)  # a new error class needs a documented HTTP status here
    for cls, status in DOCUMENTED.items():
        error = cls("message") if cls is not InvalidInput else cls("message", 3)
        assert http_status(error) == status, cls.__name__


def test_a_subclass_maps_like_its_parent_and_an_unmapped_error_is_500() -> None:
    class BadPixel(InvalidInput):
        pass

    class QueueQuota(Overloaded):
        pass

    assert http_status(BadPixel("no")) == 400
    assert http_status(QueueQuota("no")) == 429
    assert http_status(ServiceError("unclassified")) == 500


# --- end to end -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[Harness]:
    config = test_config(backend="null", digit_detector="none", http_port=free_port(), max_message_bytes=MAX_BODY)
    harness = Harness(MnistServer(config).start())
    yield harness
    harness.close()


def rest(served: Harness, path: str, body: bytes | dict | None = None, method: str | None = None):
    """(status, headers, decoded JSON body) of a REST call; errors are answers too."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    url = f"http://127.0.0.1:{served.server.http_port}{path}"
    request = urllib.request.Request(url, data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, headers, raw = err.code, err.headers, err.read()
    assert headers["Content-Type"].startswith("application/json"), (status, raw[:200])
    return status, headers, json.loads(raw)


@pytest.fixture
def fault(served: Harness, monkeypatch: pytest.MonkeyPatch):
    """fault(error): the data plane's infer raises `error` (the REST handler's call into the plane, not the route)."""

    def inject(error: BaseException) -> None:
        async def infer(*args, **kwargs):
            raise error

        monkeypatch.setattr(served.server.plane, "infer", infer)

    return inject


def test_a_served_infer_is_200(served: Harness) -> None:
    status, _, body = rest(served, INFER, DIGIT)
    assert status == 200 and body["model_name"] == MODEL
    assert {output["name"] for output in body["outputs"]} == {"probabilities", "digit"}


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidInput("pixel 3 is out of range"), 400),
        (NotFound("no model 'x'; this server serves 'null'"), 404),
        (Overloaded("the queue is full; retry later"), 429),
        (Cancelled("the caller went away"), 499),
        (Unsupported("shared-memory tensors are not supported"), 501),
        (AlreadyExists("the answer 'x' already has a label"), 409),
        (NotReady("model is still loading; retry shortly"), 503),
        (ShuttingDown("server is shutting down; retry on another replica"), 503),
        (Unavailable("worker(s) 1 did not answer within 2 s: one of them may hold this answer; retry"), 503),
        (DeadlineExpired("the deadline passed before the answer was ready"), 504),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_each_plane_error_is_its_status_with_the_message_as_json(served, fault, error, status) -> None:
    fault(error)
    got, headers, body = rest(served, INFER, DIGIT)
    assert (got, body) == (status, {"error": str(error)})
    assert "Retry-After" not in headers  # no hint given, none invented


@pytest.mark.parametrize(
    ("error", "status", "challenge"),
    [
        (Unauthenticated("missing credentials"), 401, 'Bearer realm="mnist-serve"'),
        (Unauthenticated("malformed authorization header", "malformed"), 401, 'error="invalid_request"'),
        (PermissionDenied("the bearer token is not accepted"), 403, None),
        (AuthRefused("refused some other way"), 403, None),
    ],
    ids=["missing", "malformed", "denied", "refused"],
)
def test_an_auth_refusal_is_401_with_a_bearer_challenge_or_403(served, fault, error, status, challenge) -> None:
    fault(error)
    got, headers, body = rest(served, INFER, DIGIT)
    assert (got, body) == (status, {"error": str(error)})
    if challenge is None:
        assert "WWW-Authenticate" not in headers
    else:
        assert headers["WWW-Authenticate"].startswith("Bearer ") and challenge in headers["WWW-Authenticate"]


def test_overload_with_a_retry_hint_is_429_with_retry_after_in_seconds_and_ms(served, fault) -> None:
    fault(Overloaded("the queue is full; retry later", 2.4))
    status, headers, body = rest(served, INFER, DIGIT)
    assert (status, body) == (429, {"error": "the queue is full; retry later"})
    assert headers["Retry-After"] == "2" and headers["retry-after-ms"] == "2400"
    fault(Overloaded("busy", 0.01))  # a hint under a second is still a whole second: HTTP's Retry-After unit
    assert rest(served, INFER, DIGIT)[1]["Retry-After"] == "1"


def test_an_unexpected_exception_is_500_with_a_generic_message_and_the_server_keeps_serving(
    served, fault, monkeypatch, caplog
) -> None:
    before = served.metrics().get('mnist_requests_total{code="INTERNAL",method="http:ModelInfer"}', 0)
    fault(RuntimeError("secret internal detail /opt/model"))
    with caplog.at_level(logging.ERROR, logger="mnist.rest"):
        status, _, body = rest(served, INFER, DIGIT)
    assert (status, body) == (500, {"error": "internal error in ModelInfer; see the server log"})
    assert "secret internal detail /opt/model" in caplog.text  # in the log for the operator, not in the answer
    after = served.metrics()['mnist_requests_total{code="INTERNAL",method="http:ModelInfer"}']
    assert after == before + 1
    fault(ServiceError("an error class with no status of its own"))
    assert rest(served, INFER, DIGIT)[0] == 500
    monkeypatch.undo()
    assert rest(served, INFER, DIGIT)[0] == 200  # still serving


# --- errors the protocol produces itself ------------------------------------------------------------------------


def test_a_body_that_is_not_json_is_400(served: Harness) -> None:
    status, _, body = rest(served, INFER, b"not json")
    assert status == 400 and "not JSON" in body["error"]


def test_an_unknown_model_is_404_naming_the_served_one(served: Harness) -> None:
    status, _, body = rest(served, "/v2/models/resnet/infer", DIGIT)
    assert status == 404 and "'null'" in body["error"]


def test_an_unknown_route_is_404(served: Harness) -> None:
    status, _, body = rest(served, "/v2/nothing/here")
    assert (status, body) == (404, {"error": "no such endpoint: /v2/nothing/here"})


def test_a_method_the_route_does_not_take_is_405_naming_those_it_does(served: Harness) -> None:
    status, headers, body = rest(served, INFER, method="GET")
    assert (status, body) == (405, {"error": f"GET is not allowed on {INFER}"})
    assert headers["Allow"] == "POST"
    status, headers, _ = rest(served, "/v2/health/live", b"{}", method="POST")
    assert status == 405 and headers["Allow"] == "GET"


def test_a_body_over_the_limit_is_413_and_the_server_keeps_serving(served: Harness) -> None:
    status, _, body = rest(served, INFER, b" " * (MAX_BODY + 1))
    assert (status, body) == (413, {"error": f"request body over the limit of {MAX_BODY:,} bytes"})
    assert rest(served, INFER, DIGIT)[0] == 200


def test_model_control_switched_off_is_501(served: Harness) -> None:
    status, _, body = rest(served, f"/v2/repository/models/{MODEL}/unload", b"{}")
    assert status == 501 and "model control is off" in body["error"]
    assert rest(served, INFER, DIGIT)[0] == 200  # nothing was unloaded


def test_a_shared_memory_tensor_is_501(served: Harness) -> None:
    entry = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "parameters": {"shared_memory_region": "r"}}
    status, _, body = rest(served, INFER, {"inputs": [entry]})
    assert status == 501 and "shared-memory" in body["error"]


def test_a_timeout_parameter_that_is_not_a_positive_number_is_400(served: Harness) -> None:
    status, _, body = rest(served, INFER, {**DIGIT, "parameters": {"timeout": -5}})
    assert status == 400 and "parameters.timeout" in body["error"]
