"""Bearer tokens as a table: every gRPC method the server registers and every REST route it serves, called with no
token, a malformed header, an unknown token and the right one.

The table is not written out by hand. The gRPC methods are those of every service the server registers (recorded as
it starts, each service's methods from its descriptor), the REST routes those of its router: a method or route
added later is in the table by itself, as protected, and fails here until it checks tokens or is listed in
OPEN_GRPC or OPEN_REST on purpose. A refused call must do no work: it reaches nothing of the data plane (every call
into it is recorded), and a refused repository unload or load leaves the model as it was.

The server (server/security.py) knows one kind of token: any accepted token may call any protected method, model
control (repository load/unload) included; there are no scopes to test.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2

from proto.inference import grpc_service_pb2 as oip
from proto.inference import grpc_service_pb2_grpc as oip_grpc
from server.app import MnistServer
from server.config import BUNDLED_MODEL
from server.plane.data_plane import DataPlane
from tests.support import free_port, test_config

MODEL = "googlenet-fast"
TOKEN = "the-right-token-0123456789abcdef"  # every scope
INFER_ONLY = "an-inference-token-0123456789abc"  # no feedback scope
FEEDBACK_ONLY = "a-feedback-token-0123456789abcde"
CREDENTIALS = {  # what a caller sends -> what a protected method answers (gRPC code, HTTP status)
    "none": (None, grpc.StatusCode.UNAUTHENTICATED, 401),
    "malformed": ("Basic dXNlcjpwYXNzd29yZA==", grpc.StatusCode.UNAUTHENTICATED, 401),
    "wrong": ("Bearer not-a-token-this-server-knows", grpc.StatusCode.PERMISSION_DENIED, 403),
}
REFUSED_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# Deliberately open: probes must work without a token.
OPEN_GRPC = {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List", "/grpc.health.v1.Health/Watch"}
OPEN_REST = {"Page", "ServerLive", "ServerReady"}  # the web page (it asks for a token itself) and /v2/health/*
SERVICES = {  # every service registered on the gRPC port; a new one is added here once its protection is decided
    "mnist.v1.Classifier",
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
}
# Calls a right token makes that would change the shared server name a model that does not exist.
HARMLESS_NAME = "no-such-model"


# --- the server, with the registrations recorded and the data plane watched ---------------------------------------


class HandlerCallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple = ()


@dataclass
class Served:
    server: MnistServer
    channel: grpc.Channel
    methods: dict[str, MethodDescriptor]  # "/package.Service/Method" -> its descriptor, every one registered
    plane_calls: list[str]  # the data plane's methods called, in order, since the last clear()

    @property
    def oip(self) -> oip_grpc.GRPCInferenceServiceStub:
        return oip_grpc.GRPCInferenceServiceStub(self.channel)

    def model_state(self, name: str = MODEL) -> list[tuple[str, str]]:
        index = self.oip.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10, metadata=bearer(TOKEN))
        return [(m.version, m.state) for m in index.models if m.name == name]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def record_plane(plane: DataPlane, calls: list[str]) -> None:
    """Every public method of `plane` (one object under every transport) appends its name to `calls` when called."""
    for name, member in inspect.getmembers(type(plane), inspect.isfunction):
        if name.startswith("_"):
            continue
        bound = getattr(plane, name)
        if inspect.iscoroutinefunction(member):

            async def wrapper(*args, _bound=bound, _name=name, **kwargs):
                calls.append(_name)
                return await _bound(*args, **kwargs)

        else:

            def wrapper(*args, _bound=bound, _name=name, **kwargs):
                calls.append(_name)
                return _bound(*args, **kwargs)

        setattr(plane, name, wrapper)


def registered_methods(handlers: list[grpc.GenericRpcHandler], registered: dict[str, dict]) -> dict:
    """The path ("/package.Service/Method") -> descriptor of every method of every service registered, each checked
    to be served by the handler registered for it."""
    pool = descriptor_pool.Default()
    methods: dict[str, MethodDescriptor] = {}
    for handler in handlers:
        service = pool.FindServiceByName(handler.service_name())
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            assert handler.service(HandlerCallDetails(path)) is not None, f"{path} is declared but not served"
            methods[path] = method
    for service_name, handlers_by_method in registered.items():
        service = pool.FindServiceByName(service_name)
        for name in handlers_by_method:
            methods[f"/{service.full_name}/{name}"] = service.methods_by_name[name]
    return methods


def repository(folder: Path) -> Path:
    (folder / MODEL / "1").mkdir(parents=True)
    shutil.copyfile(BUNDLED_MODEL, folder / MODEL / "1" / "model.onnx")
    tokens = folder / "tokens"
    lines = [f"{TOKEN} infer,feedback", INFER_ONLY, f"{FEEDBACK_ONLY} feedback"]
    tokens.write_text("# accepted tokens and their scopes\n" + "\n".join(lines) + "\n")
    tokens.chmod(0o600)
    return folder


def start(folder: Path) -> Served:
    """A token-protected server with model control on, the REST API and a repository of one model (null engine)."""
    handlers: list[grpc.GenericRpcHandler] = []
    registered: dict[str, dict] = {}
    real_server = grpc.aio.server

    def recording_server(*args, **kwargs) -> grpc.aio.Server:
        server = real_server(*args, **kwargs)
        add_generic, add_registered = server.add_generic_rpc_handlers, server.add_registered_method_handlers

        def add_generic_recorded(generic_rpc_handlers):
            handlers.extend(generic_rpc_handlers)
            return add_generic(generic_rpc_handlers)

        def add_registered_recorded(service_name, method_handlers):
            registered[service_name] = dict(method_handlers)
            return add_registered(service_name, method_handlers)

        server.add_generic_rpc_handlers = add_generic_recorded
        server.add_registered_method_handlers = add_registered_recorded
        return server

    config = test_config(
        backend="null",
        digit_detector="none",
        model_repository=str(folder),
        repository_poll_seconds=0,
        model_control="on",
        http_port=free_port(),
        auth_tokens_file=str(folder / "tokens"),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpc.aio, "server", recording_server)
        server = MnistServer(config).start()
    calls: list[str] = []
    record_plane(server.plane, calls)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return Served(server, channel, registered_methods(handlers, registered), calls)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    harness = start(repository(tmp_path_factory.mktemp("auth-table")))
    yield harness
    harness.channel.close()
    harness.server.stop()


# --- calling any gRPC method ------------------------------------------------------------------------------------


def request_for(method: MethodDescriptor, refused: bool) -> Any:
    """A request for `method`: one that would do visible work when it names a model (refused calls must not do it);
    a right token's repository load/unload names no real model, so the shared server keeps its model."""
    request = message_factory.GetMessageClass(method.input_type)()
    name = MODEL if refused else HARMLESS_NAME
    if method.name in ("RepositoryModelLoad", "RepositoryModelUnload"):
        request.model_name = name
    elif method.name in ("ModelInfer", "ModelStreamInfer"):
        request.model_name = MODEL
        request.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28])
        request.raw_input_contents.append(bytes(range(256)) * 3 + bytes(16))
    elif method.name == "ServerReflectionInfo":
        request.list_services = ""
    elif method.full_name.startswith("inference.") and "name" in method.input_type.fields_by_name:
        request.name = MODEL
    return request


def call(channel: grpc.Channel, path: str, method: MethodDescriptor, request: Any, authorization: str | None):
    """The status `path` answers (OK when it answers, or, for a stream, when its first response arrives)."""
    response_class = message_factory.GetMessageClass(method.output_type)
    metadata = (("authorization", authorization),) if authorization is not None else None
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, True): channel.stream_stream,
    }
    stub = kinds[(method.client_streaming, method.server_streaming)](
        path, request_serializer=type(request).SerializeToString, response_deserializer=response_class.FromString
    )
    try:
        if method.client_streaming:
            responses = stub(iter([request]), timeout=10, metadata=metadata)
        else:
            responses = stub(request, timeout=10, metadata=metadata)
        if method.server_streaming:
            next(responses)  # a health Watch never ends by itself: its first answer is the verdict
            responses.cancel()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# --- gRPC: the table --------------------------------------------------------------------------------------------


def test_the_table_covers_every_service_and_the_open_methods_exist(served: Served) -> None:
    assert {path.split("/")[1] for path in served.methods} == SERVICES  # a new service needs its protection decided
    assert OPEN_GRPC <= set(served.methods)  # what is open on purpose is still there (and so still tested open)
    assert {"/inference.GRPCInferenceService/RepositoryModelUnload", "/mnist.v1.Classifier/Classify"} <= set(
        served.methods
    )


@pytest.mark.parametrize("credential", sorted(CREDENTIALS))
def test_every_protected_grpc_method_refuses_a_caller_without_the_right_token_and_does_no_work(
    served: Served, credential: str
) -> None:
    authorization, code, _ = CREDENTIALS[credential]
    wrong = {}
    for path, method in sorted(served.methods.items()):
        if path in OPEN_GRPC:
            continue
        served.plane_calls.clear()
        got = call(served.channel, path, method, request_for(method, refused=True), authorization)
        if got != code or served.plane_calls:
            wrong[path] = (got.name, list(served.plane_calls))
    assert not wrong, f"expected {code.name} and no data-plane call; got: {wrong}"
    assert served.model_state() == [("1", "READY")]  # the refused unloads left the model loaded


def test_every_protected_grpc_method_answers_the_right_token(served: Served) -> None:
    refused = {}
    for path, method in sorted(served.methods.items()):
        got = call(served.channel, path, method, request_for(method, refused=False), f"Bearer {TOKEN}")
        if got in REFUSED_CODES:
            refused[path] = got.name
    assert not refused
    assert served.model_state() == [("1", "READY")]


def test_a_token_reaches_only_the_calls_its_scopes_allow(served: Served) -> None:
    """Feedback trains the next version: it needs the feedback scope; a token with only that scope reads nothing."""
    for path, method in sorted(served.methods.items()):
        if path in OPEN_GRPC:
            continue
        request = request_for(method, refused=False)
        with_infer = call(served.channel, path, method, request, f"Bearer {INFER_ONLY}")
        with_feedback = call(served.channel, path, method, request, f"Bearer {FEEDBACK_ONLY}")
        if path.endswith("/Feedback"):
            assert with_infer == grpc.StatusCode.PERMISSION_DENIED and with_feedback not in REFUSED_CODES, path
        else:
            assert with_infer not in REFUSED_CODES and with_feedback == grpc.StatusCode.PERMISSION_DENIED, path
    routes = rest_routes(served)
    assert rest_call(served, "Feedback", routes["Feedback"], f"Bearer {INFER_ONLY}", refused=True)[0] == 403
    assert rest_call(served, "Feedback", routes["Feedback"], f"Bearer {FEEDBACK_ONLY}", refused=True)[0] not in (
        401,
        403,
    )
    assert rest_call(served, "ReadDigits", routes["ReadDigits"], f"Bearer {FEEDBACK_ONLY}", refused=True)[0] == 403


def test_the_right_token_does_reach_the_data_plane(served: Served) -> None:
    """The no-work check above is not vacuous: an accepted call is seen arriving at the data plane."""
    method = served.methods["/inference.GRPCInferenceService/ModelInfer"]
    served.plane_calls.clear()
    path = "/inference.GRPCInferenceService/ModelInfer"
    assert call(served.channel, path, method, request_for(method, True), f"Bearer {TOKEN}") == grpc.StatusCode.OK
    assert "infer" in served.plane_calls


@pytest.mark.parametrize("credential", [*sorted(CREDENTIALS), "right"])
def test_health_is_open_to_every_caller(served: Served, credential: str) -> None:
    authorization = f"Bearer {TOKEN}" if credential == "right" else CREDENTIALS[credential][0]
    for path in sorted(OPEN_GRPC):
        method = served.methods[path]
        request = message_factory.GetMessageClass(method.input_type)()
        assert call(served.channel, path, method, request, authorization) == grpc.StatusCode.OK, path
    stub = served.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    metadata = (("authorization", authorization),) if authorization else None
    reply = stub(health_pb2.HealthCheckRequest(service=MODEL), timeout=10, metadata=metadata)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- REST: the table ---------------------------------------------------------------------------------------------


def rest_routes(served: Served) -> dict[str, tuple[str, str]]:
    """Route name -> (method, path template) of every route the running REST server has."""
    app = served.server._rest._runner.app
    return {route.name: (route.method, route.resource.canonical) for route in app.router.routes()}


SAMPLE_PNG = sorted((Path(__file__).resolve().parents[1] / "server" / "samples").glob("*.png"))[0]


def rest_call(served: Served, name: str, route: tuple[str, str], authorization: str | None, refused: bool):
    """(status, headers, body) of one route, with a body that does work when the route does any."""
    method, template = route
    model = MODEL if refused or "Repository" not in name else HARMLESS_NAME
    path = template.replace("{name}", model).replace("{version}", "1")
    body: bytes | None = None
    if name.startswith("ModelInfer"):
        data = [0] * 783 + [255]
        body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": data}]})
        body = body.encode()
    elif name.startswith("Read"):  # ReadDigits, ReadTable, ReadExpression: an image
        body = SAMPLE_PNG.read_bytes()
    elif method == "POST":
        body = b"{}"
    headers = {"Authorization": authorization} if authorization is not None else {}
    request = urllib.request.Request(f"http://127.0.0.1:{served.server.http_port}{path}", body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_the_rest_table_covers_every_route_and_the_open_ones_exist(served: Served) -> None:
    routes = rest_routes(served)
    assert OPEN_REST <= set(routes)
    assert {"ModelInfer", "ReadDigits", "RepositoryModelLoad", "RepositoryModelUnload"} <= set(routes)


@pytest.mark.parametrize("credential", sorted(CREDENTIALS))
def test_every_protected_rest_route_refuses_a_caller_without_the_right_token_and_does_no_work(
    served: Served, credential: str
) -> None:
    authorization, _, status = CREDENTIALS[credential]
    wrong = {}
    for name, route in sorted(rest_routes(served).items()):
        if name in OPEN_REST:
            continue
        served.plane_calls.clear()
        got, headers, body = rest_call(served, name, route, authorization, refused=True)
        challenge = headers.get("WWW-Authenticate", "")
        if (
            got != status
            or served.plane_calls
            or (status == 401) != challenge.startswith("Bearer ")
            or "error" not in json.loads(body)
        ):
            wrong[name] = (got, challenge, list(served.plane_calls))
    assert not wrong, f"expected {status} (401 with a Bearer challenge) and no data-plane call; got: {wrong}"
    assert served.model_state() == [("1", "READY")]  # the refused unloads left the model loaded


def test_every_protected_rest_route_answers_the_right_token(served: Served) -> None:
    answers = {}
    for name, route in sorted(rest_routes(served).items()):
        answers[name] = rest_call(served, name, route, f"Bearer {TOKEN}", refused=False)[0]
    assert not {name: status for name, status in answers.items() if status in (401, 403)}
    # the calls that name the served model are answered, not only "not refused"
    assert answers["ModelInfer"] == answers["ModelInfer.version"] == answers["ReadDigits"] == 200
    assert answers["ServerMetadata"] == answers["ModelMetadata"] == answers["RepositoryIndex"] == 200
    assert served.model_state() == [("1", "READY")]


@pytest.mark.parametrize("credential", [*sorted(CREDENTIALS), "right"])
def test_the_web_page_and_rest_health_are_open_to_every_caller(served: Served, credential: str) -> None:
    authorization = f"Bearer {TOKEN}" if credential == "right" else CREDENTIALS[credential][0]
    routes = rest_routes(served)
    for name in sorted(OPEN_REST):
        status, headers, body = rest_call(served, name, routes[name], authorization, refused=True)
        assert status == 200, (name, status, body[:200])
    status, headers, body = rest_call(served, "Page", routes["Page"], authorization, refused=True)
    assert headers["Content-Type"].startswith("text/html") and b"/v2/models/" in body


# --- model control: a refused load or unload changes nothing ---------------------------------------------------


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Served]:
    harness = start(repository(tmp_path))
    yield harness
    harness.channel.close()
    harness.server.stop()


def _unload(served: Served, metadata) -> grpc.StatusCode:
    return _control(served, "RepositoryModelUnload", metadata)


def _load(served: Served, metadata) -> grpc.StatusCode:
    return _control(served, "RepositoryModelLoad", metadata)


def _control(served: Served, name: str, metadata) -> grpc.StatusCode:
    request_class: Callable = getattr(oip, f"{name}Request")
    try:
        getattr(served.oip, name)(request_class(model_name=MODEL), timeout=30, metadata=metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _rest_control(served: Served, action: str, authorization: str | None) -> int:
    route = ("POST", f"/v2/repository/models/{{name}}/{action}")
    name = "RepositoryModelLoad" if action == "load" else "RepositoryModelUnload"
    return rest_call(served, name, route, authorization, refused=True)[0]


def _settled_state(served: Served, guard_s: float = 60.0) -> list[tuple[str, str]]:
    """The model's versions once none is still UNLOADING (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + guard_s
    states = served.model_state()
    while any(state == "UNLOADING" for _, state in states):
        assert time.monotonic() < deadline, f"still unloading after {guard_s:.0f} s: {states}"
        time.sleep(0.05)
        states = served.model_state()
    return states


def test_a_refused_unload_leaves_the_model_loaded_and_a_refused_load_leaves_it_unloaded(control: Served) -> None:
    for authorization, code, status in CREDENTIALS.values():
        metadata = (("authorization", authorization),) if authorization else None
        assert _unload(control, metadata) == code
        assert _rest_control(control, "unload", authorization) == status
        assert control.model_state() == [("1", "READY")]
    assert _unload(control, bearer(TOKEN)) == grpc.StatusCode.OK
    unloaded = _settled_state(control)  # the unload answers first; the retiring version then drains (UNLOADING)
    assert unloaded != [("1", "READY")] and not control.server.plane.model_ready(MODEL)
    for authorization, code, status in CREDENTIALS.values():
        metadata = (("authorization", authorization),) if authorization else None
        assert _load(control, metadata) == code
        assert _rest_control(control, "load", authorization) == status
        assert control.model_state() == unloaded and not control.server.plane.model_ready(MODEL)
    assert _rest_control(control, "load", f"Bearer {TOKEN}") == 200
    assert control.model_state() == [("1", "READY")]
