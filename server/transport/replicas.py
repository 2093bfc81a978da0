"""Labels for answers another replica of a fleet gave (`--feedback-peers`).

Each replica remembers only its own answers, and a fleet's clients spread their calls over the replicas (round_robin,
server/balancing.py), so a Feedback call often reaches a replica that did not give the answer. With `--feedback-peers`
naming the fleet (a list of host:port, or `dns:///NAME:PORT` for a headless Service, resolved again every
DNS_REFRESH_S), such a replica asks the others with the same Feedback call, marked forwarded (FORWARDED_KEY) and
carrying the caller's own token: the replica that answered takes the label (its live quality, its canary counts, its
database writer) or refuses it (a second label, a label of the wrong kind), and a forwarded call is never forwarded
again. Replicas are asked one after another; this replica's own address (its port on one of its own addresses) is
skipped.

A replica that cannot be reached (no connection: gone or not yet listening) cannot give its answers and is passed
over, logged at most once a minute; one that answers UNAVAILABLE (draining, its own workers slow), does not answer
within ASK_TIMEOUT_S, or sheds the call might hold the answer, so when no other has it the call is refused UNAVAILABLE
(retry) rather than NOT_FOUND. Over TLS, an address a DNS name resolved to is checked against that name: the
replicas' certificates carry the Service's name (e.g. mnist-serve-headless), as a client's check would need.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time

import grpc

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server.errors import AlreadyExists, InvalidInput, Unavailable
from server.feedback.answers import CLASSIFY, READ_DIGITS, Answer
from server.feedback.loop import FeedbackResult

log = logging.getLogger("mnist.feedback")

FORWARDED_KEY = "x-mnist-feedback-forwarded"  # metadata of a Feedback call one replica sends another
ASK_TIMEOUT_S = 2.0
DNS_REFRESH_S = 10.0
PASSED_OVER_LOG_S = 60.0  # a replica that cannot be reached is logged at most this often


class ReplicaPeers:
    """The fleet's other replicas, as `targets` (host:port or dns:///NAME:PORT); `credentials` None: plaintext."""

    def __init__(
        self,
        targets: list[str],
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = ASK_TIMEOUT_S,
    ) -> None:
        self.targets = targets
        self.credentials = credentials
        self.timeout = timeout
        self.own_port: int | None = None  # set once this replica listens: its own address is not asked
        self._own_hosts = _own_hosts()
        self._resolved: dict[str, tuple[float, list[str]]] = {}  # dns target -> (when, host:port addresses)
        self._names: dict[str, str] = {}  # an address a DNS name resolved to -> that name (its certificate's)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._logged: dict[str, float] = {}  # address -> when it was last logged as passed over

    async def ask(
        self, request_id: str, label: int | None, text: str | None, model: str, authorization: str | None
    ) -> FeedbackResult | None:
        """The result from the replica that gave the answer; None when no reachable replica has it. Re-raises that
        replica's refusal; Unavailable when none had it but one did not answer in time."""
        request = pb.FeedbackRequest(request_id=request_id, model_name=model)
        if label is not None:
            request.label = label
        else:
            request.text = text or ""
        metadata = [(FORWARDED_KEY, "1")] + ([("authorization", authorization)] if authorization else [])
        silent = []
        for address in await self.addresses():
            stub = pb_grpc.ClassifierStub(self._channel(address))
            try:
                reply = await stub.Feedback(request, metadata=metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    continue
                if code == grpc.StatusCode.UNAVAILABLE and _unreachable(error):
                    self._passed_over(address, error)
                    continue  # not running (or not accepting us): its answers are not to be had
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    raise AlreadyExists(error.details()) from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidInput(error.details()) from None
                log.warning(
                    "feedback: replica %s did not take a forwarded label: %s %s", address, code.name, error.details()
                )
                silent.append(address)
                continue
            answer = Answer(
                request_id,
                reply.model_name,
                reply.model_version,
                CLASSIFY if label is not None else READ_DIGITS,
                reply.prediction,
                math.nan,  # the replica that answered stored these; the reply needs none
                None,
                0.0,
                None,
            )
            truth = str(label) if label is not None else (text or "").strip()
            return FeedbackResult(answer, truth, reply.correct, reply.stored, reply.live_accuracy, reply.live_answers)
        if silent:
            raise Unavailable(
                f"replica(s) {', '.join(silent)} did not take the label within {self.timeout:g} s: one of them may "
                "hold this answer; retry"
            )
        return None

    async def addresses(self) -> list[str]:
        """Every replica's host:port, a DNS name's addresses looked up again every DNS_REFRESH_S; not this one's."""
        addresses = []
        for target in self.targets:
            if target.startswith("dns:///"):
                addresses += await self._resolve(target)
            else:
                addresses.append(target)
        addresses = [address for address in dict.fromkeys(addresses) if not self._is_own(address)]
        for gone in [address for address in self._channels if address not in addresses]:  # pods come and go
            await self._channels.pop(gone).close()
        return addresses

    async def _resolve(self, target: str) -> list[str]:
        when, addresses = self._resolved.get(target, (0.0, []))
        if time.monotonic() - when < DNS_REFRESH_S:
            return addresses
        host, _, port = target.removeprefix("dns:///").rpartition(":")
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except OSError as error:
            log.warning("feedback: cannot resolve %s (%s): its replicas are not asked", target, error)
            self._resolved[target] = (time.monotonic(), addresses)  # the last answer, if any, until it resolves again
            return addresses
        addresses = list(dict.fromkeys(f"[{a[4][0]}]:{port}" if ":" in a[4][0] else f"{a[4][0]}:{port}" for a in found))
        self._names.update(dict.fromkeys(addresses, host.strip("[]")))
        self._resolved[target] = (time.monotonic(), addresses)
        return addresses

    def _is_own(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        return self.own_port is not None and port == str(self.own_port) and host.strip("[]") in self._own_hosts

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self.credentials is None:
                channel = grpc.aio.insecure_channel(address)
            else:  # an address a DNS name gave is checked against that name, as a client naming it would
                name = self._names.get(address)
                options = [("grpc.ssl_target_name_override", name)] if name else []
                channel = grpc.aio.secure_channel(address, self.credentials, options)
            self._channels[address] = channel
        return channel

    def _passed_over(self, address: str, error: grpc.aio.AioRpcError) -> None:
        now = time.monotonic()
        if now - self._logged.get(address, -PASSED_OVER_LOG_S) >= PASSED_OVER_LOG_S:
            self._logged[address] = now
            log.warning("feedback: replica %s cannot be reached, passed over: %s", address, error.details())

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def _unreachable(error: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE because no connection could be made (gone, not yet listening, or a TLS handshake refused), not an
    answer from a replica that may hold the label (draining, or its own workers slow)."""
    details = (error.details() or "").lower()
    return any(words in details for words in ("failed to connect", "connection refused", "handshake", "ssl"))


def _own_hosts() -> set[str]:
    """The names and addresses a peer list may use for this machine."""
    hosts = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    try:
        hosts |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return hosts
