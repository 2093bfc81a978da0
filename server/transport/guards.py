"""Every gRPC method this server exposes, guarded the same way: ours, health and reflection alike.

A guarded method parses its request with a deserializer that never raises (garbage is answered
INVALID_ARGUMENT and counted, where gRPC's own would answer INTERNAL, unseen), turns every
failure into a status through one table, and counts the call by method and code. On top:

- `CallGate` counts the unary model calls in flight (gRPC itself bounds all calls in flight:
  `--max-concurrent-calls`), refuses new calls once shutdown begins (UNAVAILABLE), and at the
  end of the grace period answers what is still running UNAVAILABLE rather than letting gRPC
  cancel it.
- `StreamGate` bounds the long-lived streams (health Watch, reflection) that would otherwise
  pile up without limit, closes reflection streams that sit idle, and ends every stream with
  UNAVAILABLE at shutdown. Streams are coroutines, so an idle one costs memory, never a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

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
from server.security import INFER, TokenChecker, grpc_authorization, scope_of
from server.transport.wire import ParsedRequest, safe_parser

log = logging.getLogger("mnist.guards")

STATUS_OF: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    AuthRefused: grpc.StatusCode.PERMISSION_DENIED,  # any other refusal of credentials
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
}
REFUSAL_GRACE_S = 0.2  # a refused request stream: how long its first request may take to arrive
# Our deadline starts when the call's headers reach gRPC here, the caller's when it sent them: on a loaded machine its
# own cancel at its deadline (RST_STREAM) arrived up to tens of ms before ours, and read as CANCELLED (mnist-attack's
# shutdown check, about one run in ten). A call cancelled this close to its deadline is counted DEADLINE_EXCEEDED.
DEADLINE_SLACK_S = 0.025
STREAM_WRITE_TIMEOUT_S = 10.0  # a stream whose client reads nothing this long is ended
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata on RESOURCE_EXHAUSTED: how long to wait before retrying
# grpcio reports "no deadline" as a huge time_remaining().
NO_DEADLINE_SECONDS = 24 * 3600


def status_of(error: ServiceError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def request_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """time.monotonic() by which the client needs the answer, or None when it set no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return time.monotonic() + remaining


@dataclass
class CallGate:
    """Unary calls of the model service in flight, and the shutdown switch. Their number is bounded by gRPC itself
    (`maximum_concurrent_rpcs`, server/app.py), which refuses a call over it before any handler runs: the cheapest
    refusal grpc.aio has."""

    in_flight: int = 0
    closing: bool = False  # new calls are answered UNAVAILABLE
    ended: bool = False  # grace is over: calls still running are being ended UNAVAILABLE
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _idle: asyncio.Event | None = None

    def enter(self) -> None:
        if self.closing:
            raise ShuttingDown("server is shutting down; retry on another replica")
        self.in_flight += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)

    def leave(self) -> None:
        self.in_flight -= 1
        self._tasks.discard(asyncio.current_task())
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def close(self, grace: float) -> None:
        """Refuse new calls, give running ones `grace` seconds, then end the rest UNAVAILABLE."""
        self.closing = True
        if self.in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                self.ended = True
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.sleep(0)  # let the cancelled handlers write their UNAVAILABLE


@dataclass
class StreamGate:
    """Long-lived streams open now: a bound, an idle limit for request streams, and the shutdown switch."""

    limit: int
    idle_seconds: float
    open: int = 0
    closing: asyncio.Event = field(default_factory=asyncio.Event)


class _StreamEnded(Exception):
    """A request stream was ended by the server: `code` and `message` are what the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


@dataclass(frozen=True)
class UnreadRefusal:
    """Refusals decided before a call's message is read, for the unary `methods` named.

    grpc.aio receives a unary call's message before any handler of ours runs; a request-streaming handler runs first
    and reads when it asks. So these methods are registered as request streams of one message (the same bytes on
    the wire: any unary client calls them as before), and `check(deadline)` runs before the read: the error to
    answer unread, or None to read the message and go on as any unary call. A refused call then costs the server
    no receive and no parse (loadtest/cpu_cost.py measures it against an echo server's call)."""

    methods: frozenset[str]
    check: Callable[[float | None], ServiceError | None]


class _SeriesByCode(dict):
    """One method's series of a metric, by status code, each created when its code first happens.

    Created up front for all 17 codes of every method of every service (the Open Inference Protocol alone has
    20), they made every scrape ~10,000 lines and 75 ms of generation holding the GIL."""

    def __init__(self, family: Any, method: str) -> None:
        super().__init__()
        self.family, self.method = family, method

    def __missing__(self, code: grpc.StatusCode) -> Any:
        series = self[code] = self.family.labels(self.method, code.name)
        return series


def _counters(method: str, metrics: ServiceMetrics) -> tuple[dict, dict]:
    return _SeriesByCode(metrics.request_latency, method), _SeriesByCode(metrics.requests, method)


def _trailers(retry_after: float | None) -> tuple[tuple[str, str], ...]:
    return ((RETRY_AFTER_KEY, str(max(1, round(retry_after * 1000)))),) if retry_after is not None else ()


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, retry_after: float | None = None
) -> None:
    """End a stream with a status (raises grpc.aio.AbortError, which grpc handles)."""
    await context.abort(code, message, trailing_metadata=_trailers(retry_after))


def _fail(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, retry_after: float | None = None
) -> None:
    """Give a unary call its failing status, sent with the handler's return as one batch. Cheaper than `abort`,
    which sends the status itself, waits for it to leave and raises: a refusal under overload cost 0.98x an echo
    call that way. But grpc.aio then sends headers and an empty message before the status, and a client's retry
    policy never retries a call that got headers: UNAVAILABLE (a replica shutting down or not ready, which a client
    should retry on another) goes through `abort`, whose status goes out alone (Trailers-Only)."""
    context.set_code(code)
    context.set_details(message)
    if trailers := _trailers(retry_after):
        context.set_trailing_metadata(trailers)


def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _cancel_code(deadline: float | None, gate: CallGate | None) -> tuple[grpc.StatusCode, str]:
    """Why a handler was cancelled: shutdown (ours), the caller's deadline, or the caller went away."""
    if gate is not None and gate.ended:
        return grpc.StatusCode.UNAVAILABLE, "server shut down before the call finished; retry on another replica"
    if deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED, ""
    return grpc.StatusCode.CANCELLED, ""


def unary(
    method: str,
    handler: Handler,
    metrics: ServiceMetrics,
    gate: CallGate | None = None,
    auth: TokenChecker | None = None,
    service: str = "",
    refuse_unread: Callable[[float | None], ServiceError | None] | None = None,
) -> Handler:
    """Count and time one unary method's calls, and turn every failure into a status with a message.

    With `auth`, the caller's bearer token is checked first of all (UNAUTHENTICATED / PERMISSION_DENIED,
    counted in mnist_auth_refused_total): a refused call takes no gate slot and is never parsed further.
    With `refuse_unread` (UnreadRefusal.check), the handler is a request stream's: it asks that check before it
    reads the one message. With tracing on (server/tracing.py), each call is a span named `service`/`method`,
    ended with its status."""
    latency, calls = _counters(method, metrics)
    span_name, span_attributes = tracing.grpc_call(service, method)
    scope = scope_of(method)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        """`request`: the parsed message (ParsedRequest), or with `refuse_unread` the stream it is read from."""
        started = time.perf_counter()
        deadline = request_deadline(context)
        span = None
        if tracing.enabled:  # the call's span, child of the caller's traceparent, current until the call ends
            span = tracing.start_server_span(span_name, context.invocation_metadata(), span_attributes)
        metrics.in_flight.inc()
        # The error's retry hint, never the error itself: kept in this frame, an exception would make a reference
        # cycle (exception -> traceback -> frame) that only the garbage collector frees, for every refused call.
        code, message, retry_after, entered = grpc.StatusCode.OK, "", None, False
        try:
            if auth is not None:
                _check(auth, context, metrics, scope)
            parsed: ParsedRequest = request
            if refuse_unread is not None:
                if gate is not None and gate.closing:
                    raise ShuttingDown("server is shutting down; retry on another replica")
                _raise_refusal(refuse_unread, deadline)
                parsed = await _one_message(context)
            if parsed.problem:
                raise InvalidInput(parsed.problem)
            if gate is not None:
                gate.enter()
                entered = True
            return await handler(parsed.message, context)
        except ServiceError as err:
            code, message, retry_after = status_of(err), str(err), getattr(err, "retry_after", None)
        except asyncio.CancelledError:
            code, message = _cancel_code(deadline, gate)
            if code != grpc.StatusCode.UNAVAILABLE:
                raise  # the caller is gone: nobody hears an answer
        except grpc.aio.AbortError:  # the implementation aborted with its own status (health: NOT_FOUND)
            code = _aborted_code(context)
            raise
        except Exception:  # a bug, not the client's fault: log it, answer INTERNAL, keep serving
            log.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log"
        finally:
            if entered:
                gate.leave()
            metrics.in_flight.dec()
            calls[code].inc()
            latency[code].observe(time.perf_counter() - started)
            if span is not None:
                span.end_grpc(code, message)
        if code == grpc.StatusCode.UNAVAILABLE:  # a status alone, no headers first: clients may retry elsewhere
            await _abort(context, code, message, retry_after)
        _fail(context, code, message, retry_after)
        return None

    return handle


def _raise_refusal(check: Callable[[float | None], ServiceError | None], deadline: float | None) -> None:
    """Raise what `check` refuses, if anything, keeping it in no frame's variables: an exception held by a frame its
    own traceback holds is a reference cycle, which only the garbage collector frees (one per refused call)."""
    refused = check(deadline)
    if refused is not None:
        try:
            raise refused
        finally:
            refused = None


async def _one_message(context: grpc.aio.ServicerContext) -> ParsedRequest:
    """The request of a unary method registered as a request stream (UnreadRefusal), parsed by its deserializer."""
    try:
        parsed = await context.read()
    except Exception as failure:  # grpc.aio's own "server already stopped": the call cannot be read any more
        if type(failure).__name__ != "_ServerStoppedError":
            raise
        raise ShuttingDown("server stopped before the request was read; retry on another replica") from None
    if parsed is grpc.aio.EOF:
        return ParsedRequest(None, "no request message: the call ended before sending one")
    return parsed


def streaming(
    method: MethodDescriptor,
    handler: Callable[..., Any],
    metrics: ServiceMetrics,
    gate: StreamGate,
    auth: TokenChecker | None = None,
) -> Callable[..., Awaitable[None]]:
    """A server-streaming or bidirectional method, written out with context.write; bounded, counted, ended cleanly.
    With `auth`, the bearer token is checked before anything else, as for unary methods."""
    _, calls = _counters(method.name, metrics)
    bidirectional = method.client_streaming

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> None:
        code, message, retry_after, opened = grpc.StatusCode.OK, "", None, False
        try:
            if auth is not None:
                try:
                    _check(auth, context, metrics)
                except AuthRefused:
                    if bidirectional:  # as for Overloaded below: refusing under a request in flight reads INTERNAL
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(anext(aiter(request)), REFUSAL_GRACE_S)
                    raise
            if gate.closing.is_set():
                raise ShuttingDown("server is shutting down; retry on another replica")
            requests = request
            if bidirectional:
                request = _checked_requests(requests, gate.idle_seconds)
            elif request.problem:
                raise InvalidInput(request.problem)
            else:
                request = request.message
            if gate.open >= gate.limit:
                if bidirectional:  # let a first request in flight land: refusing under it makes clients see INTERNAL
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(anext(aiter(requests)), REFUSAL_GRACE_S)
                raise Overloaded(f"too many open streams ({gate.open}, the limit); retry later", 1.0)
            gate.open += 1
            metrics.open_streams.set(gate.open)
            opened = True
            await _until_closing(_write_all(handler(request, context), context), gate)
        except ServiceError as err:
            code, message, retry_after = status_of(err), str(err), getattr(err, "retry_after", None)
        except _StreamEnded as ended:
            code, message = ended.code, str(ended)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except Exception:
            log.exception("%s failed", method.name)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {method.name}; see the server log"
        finally:
            if opened:
                gate.open -= 1
                metrics.open_streams.set(gate.open)
            calls[code].inc()
        if code != grpc.StatusCode.OK:
            await _abort(context, code, message, retry_after)

    return handle


def _check(auth: TokenChecker, context: grpc.aio.ServicerContext, metrics: ServiceMetrics, scope: str = INFER) -> None:
    """The call's `authorization: Bearer <token>` metadata against `auth`; a refusal is counted and raised."""
    try:
        auth.check(grpc_authorization(context.invocation_metadata()), scope)
    except AuthRefused as refused:
        metrics.count_refusal("grpc", refused)
        raise


async def _write_all(result: Any, context: grpc.aio.ServicerContext) -> None:
    """Run a streaming implementation in either style grpc.aio allows: an async generator, or context.write."""
    if inspect.isasyncgen(result):
        async for response in result:
            await timed_write(context, response)
    else:
        await result


async def timed_write(context: grpc.aio.ServicerContext, response: Any) -> None:
    """context.write, but a client that stops reading (a zero flow-control window) cannot hold the stream forever."""
    try:
        await asyncio.wait_for(context.write(response), STREAM_WRITE_TIMEOUT_S)
    except TimeoutError:
        raise _StreamEnded(
            grpc.StatusCode.UNAVAILABLE, f"stream closed: the client read nothing for {STREAM_WRITE_TIMEOUT_S:g} s"
        ) from None


async def _until_closing(work: Awaitable[None], gate: StreamGate) -> None:
    """`work`, unless shutdown comes first: then it is cancelled and the stream ends UNAVAILABLE."""
    task = asyncio.ensure_future(work)
    closing = asyncio.ensure_future(gate.closing.wait())
    try:
        await asyncio.wait((task, closing), return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ShuttingDown("server is shutting down; reconnect to another replica")
    task.result()


async def _checked_requests(requests: AsyncIterator[ParsedRequest], idle_seconds: float) -> AsyncIterator[Any]:
    """The messages of a request stream; a malformed one or a silence of `idle_seconds` ends the stream."""
    iterator = aiter(requests)
    while True:
        try:
            parsed = await asyncio.wait_for(anext(iterator), idle_seconds or None)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _StreamEnded(
                grpc.StatusCode.UNAVAILABLE,
                f"stream closed after {idle_seconds:g} s without a request, to free server resources; open a new one",
            ) from None
        if parsed.problem:
            raise _StreamEnded(grpc.StatusCode.INVALID_ARGUMENT, parsed.problem)
        yield parsed.message


def _serialize(response: Any) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def generic_handler(
    servicer: object,
    service: ServiceDescriptor,
    metrics: ServiceMetrics,
    calls: CallGate | None = None,
    streams: StreamGate | None = None,
    parsers: dict[str, Callable[[bytes], ParsedRequest]] | None = None,
    auth: TokenChecker | None = None,
    unread: UnreadRefusal | None = None,
) -> grpc.GenericRpcHandler:
    """Guarded handlers for every method `service` declares; a method the servicer lacks is an error now, not later.

    `calls` bounds this service's unary calls (the model service's; health and model info pass
    none), `streams` its streaming ones; `parsers` replaces the safe protobuf parser per method; `auth`, when
    given, checks every call's bearer token first (the server passes none for grpc.health.v1); `unread` names the
    unary methods whose calls may be refused before their message is read."""
    handlers = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name, None)
        if not callable(implementation):
            raise TypeError(f"{type(servicer).__name__} does not implement {method.full_name}")
        parse = (parsers or {}).get(method.name) or safe_parser(message_factory.GetMessageClass(method.input_type))
        if not method.client_streaming and not method.server_streaming:
            if unread is not None and method.name in unread.methods:
                guarded = unary(method.name, implementation, metrics, calls, auth, service.full_name, unread.check)
                handlers[method.name] = grpc.stream_unary_rpc_method_handler(guarded, parse, _serialize)
            else:
                guarded = unary(method.name, implementation, metrics, calls, auth, service.full_name)
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(guarded, parse, _serialize)
            continue
        if method.client_streaming and not method.server_streaming:
            raise TypeError(f"{method.full_name} streams requests only; not supported here")
        if streams is None:
            raise TypeError(f"{method.full_name} streams: give a StreamGate to bound it")
        guarded = streaming(method, implementation, metrics, streams, auth)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(guarded, parse, _serialize)
        else:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(guarded, parse, _serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
