"""Labels for answers another worker gave (`mnist-serve --workers N`).

Each worker remembers only the answers it gave itself (server/feedback/answers.py), and the kernel spreads
connections among the workers, so a Feedback call often reaches a worker that did not give the answer. So each
worker also listens on a Unix socket of its own, `<index>.sock` in a folder the supervisor makes for the run (mode
0700: only the server's own user can connect), and a worker that does not remember a request id asks its siblings,
one after another: the worker that gave the answer takes the label itself (its live quality, its canary counts, its
database writer) and sends back the result, or its refusal (a second label, a label of the wrong kind).

One JSON object per line, one question per connection:

    {"request_id", "label", "text", "model"}   ->  {"result": {...}}  or  {"error": "NotFound" | ..., "message"}

A sibling whose socket is absent or refuses connections is not running (dead, or started again with an empty memory):
it cannot hold the answer. One that does not answer within ASK_TIMEOUT_S might: if no other sibling has the answer,
the call is refused UNAVAILABLE (retry) rather than NOT_FOUND. A client that reuses a request id across connections may
have answers under it in several workers: the label goes to the receiving worker's answer, else to the first
sibling's (in index order after the receiving worker) that has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.errors import AlreadyExists, InvalidInput, NotFound, ServiceError, Unavailable
from server.feedback.answers import Answer
from server.feedback.loop import FeedbackResult

log = logging.getLogger("mnist.feedback")

PEERS_ENV = "MNIST_WORKER_PEERS"  # the folder of the workers' sockets, made by the supervisor
ASK_TIMEOUT_S = 2.0  # how long one sibling may take to answer
MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un's sun_path, less its terminating zero (Linux)
MAX_LINE_BYTES = 64 * 1024  # a question or an answer (no image travels: the owner stores the record)
# The refusals a sibling may send back, re-raised here as the owner raised them.
_REFUSALS: dict[str, type[ServiceError]] = {cls.__name__: cls for cls in (NotFound, AlreadyExists, InvalidInput)}

Take = Callable[[str, "int | None", "str | None", str], FeedbackResult]


def socket_path(folder: Path, index: int) -> Path:
    return folder / f"{index}.sock"


class FeedbackPeers:
    """This worker's socket (answering with `take`, on the event loop) and its questions to the other `count - 1`."""

    def __init__(self, folder: Path, index: int, count: int, take: Take, timeout: float = ASK_TIMEOUT_S) -> None:
        self.folder, self.index, self.count = folder, index, count
        self.timeout = timeout
        self._take = take
        self._server: asyncio.AbstractServer | None = None

    @classmethod
    def from_environment(cls, index: int, count: int, take: Take) -> FeedbackPeers | None:
        """A worker's peers when the supervisor made their folder (PEERS_ENV) and there is another worker."""
        folder = os.environ.get(PEERS_ENV)
        return cls(Path(folder), index, count, take) if folder and count > 1 else None

    async def start(self) -> None:
        path = socket_path(self.folder, self.index)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            raise RuntimeError(
                f"the workers' socket path {path} is over {MAX_SOCKET_PATH_BYTES} bytes (a Unix socket's limit): "
                "set TMPDIR to a shorter folder"
            )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # this worker's previous process, killed before it could remove it
        self._server = await asyncio.start_unix_server(self._answer, path=str(path), limit=MAX_LINE_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(OSError):
            socket_path(self.folder, self.index).unlink()

    # --- asking -----------------------------------------------------------------------------------------------

    async def ask(self, request_id: str, label: int | None, text: str | None, model: str) -> FeedbackResult | None:
        """The result from the sibling that gave the answer under `request_id`; None when no running sibling has it.
        Re-raises that sibling's refusal; Unavailable when none had it but one did not answer in time."""
        question = json.dumps({"request_id": request_id, "label": label, "text": text, "model": model}).encode()
        silent = []
        for offset in range(1, self.count):
            sibling = (self.index + offset) % self.count
            try:
                reply = await asyncio.wait_for(self._ask_one(sibling, question), self.timeout)
                found = _result(reply["result"]) if "result" in reply else None
            except (FileNotFoundError, ConnectionRefusedError):
                continue  # not running: its answers went with its process
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as problem:
                log.warning("feedback: worker %d did not answer about a request id: %r", sibling, problem)
                silent.append(sibling)
                continue
            except (ValueError, KeyError, TypeError) as problem:
                log.warning("feedback: worker %d answered what cannot be read: %r", sibling, problem)
                silent.append(sibling)
                continue
            if found is not None:
                return found
            if reply.get("error") != NotFound.__name__:
                raise _REFUSALS.get(reply.get("error"), ServiceError)(str(reply.get("message", "refused")))
        if silent:
            raise Unavailable(
                f"worker(s) {', '.join(map(str, silent))} did not answer within {self.timeout:g} s: one of them may "
                "hold this answer; retry"
            )
        return None

    async def _ask_one(self, sibling: int, question: bytes) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(
            str(socket_path(self.folder, sibling)), limit=MAX_LINE_BYTES
        )
        try:
            writer.write(question + b"\n")
            await writer.drain()
            reply = json.loads(await reader.readuntil(b"\n"))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not isinstance(reply, dict):
            raise ValueError("an answer that is not a JSON object")
        return reply

    # --- answering --------------------------------------------------------------------------------------------

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._reply(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass  # the asker went away: it has its timeout
        finally:
            writer.close()

    async def _reply(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            question = json.loads(await asyncio.wait_for(reader.readuntil(b"\n"), self.timeout))
            request_id, label, text = str(question["request_id"]), question.get("label"), question.get("text")
            model = str(question.get("model") or "")
        except asyncio.LimitOverrunError:
            return {"error": "InvalidInput", "message": f"a question over {MAX_LINE_BYTES} bytes"}
        except (TimeoutError, ValueError, KeyError, TypeError, AttributeError, asyncio.IncompleteReadError):
            return {"error": "InvalidInput", "message": "a question this worker cannot read"}
        try:
            result = self._take(
                request_id, label if isinstance(label, int) else None, text if isinstance(text, str) else None, model
            )
        except ServiceError as refusal:
            return {"error": type(refusal).__name__, "message": str(refusal)}
        return {"result": _fields(result)}


def _fields(result: FeedbackResult) -> dict[str, Any]:
    answer = result.answer
    return {
        "request_id": answer.request_id,
        "model": answer.model,
        "version": answer.version,
        "kind": answer.kind,
        "prediction": answer.prediction,
        "confidence": answer.confidence,
        "digit_score": answer.digit_score,
        "answered_at": answer.answered_at,
        "label": result.label,
        "correct": result.correct,
        "stored": result.stored,
        "live_accuracy": result.live_accuracy,
        "live_answers": result.live_answers,
    }


def _result(fields: dict[str, Any]) -> FeedbackResult:
    answer = Answer(
        fields["request_id"],
        fields["model"],
        fields["version"],
        fields["kind"],
        fields["prediction"],
        float(fields["confidence"]),
        fields["digit_score"],
        float(fields["answered_at"]),
        None,  # the owner stored the image; the reply needs none
    )
    return FeedbackResult(
        answer,
        fields["label"],
        bool(fields["correct"]),
        bool(fields["stored"]),
        float(fields["live_accuracy"]),
        int(fields["live_answers"]),
    )
