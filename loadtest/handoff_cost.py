"""What a shared engine process would add to every call: one image handed to another process and its answer back.

    python -m loadtest.handoff_cost [--round-trips 20000] [--json OUT.json]

The design `mnist-serve --workers N` did not take (vLLM's shape: frontend processes feeding one engine process,
which batches across all of them) moves each call's 784-byte image to the engine process and 48 bytes of answer
(10 probabilities, the digit score, the digit) back. This times the cheapest such hop Python has between two
processes, a Unix socket pair with the bytes as they are (no pickling), one call in flight: wall time and the CPU
time of both processes per round trip (/proc). The real design would add a queue on each side and a wake-up of an
event loop on return; this is the floor. docs/performance.md weighs it against a call's whole server CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from loadtest.cpu_cost import process_cpu_seconds

IMAGE_BYTES = 784
ANSWER_BYTES = 48


def _receive(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError("the other process closed the socket")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _engine(sock: socket.socket) -> None:
    """The stand-in engine process: answers every image at once, as the null engine does."""
    answer = bytes(ANSWER_BYTES)
    try:
        while True:
            _receive(sock, IMAGE_BYTES)
            sock.sendall(answer)
    except EOFError:
        os._exit(0)


def measure(round_trips: int) -> dict[str, float]:
    frontend, engine = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        frontend.close()
        _engine(engine)
    engine.close()
    image = bytes(range(256)) * 3 + bytes(IMAGE_BYTES - 768)
    for _ in range(1000):  # warm
        frontend.sendall(image)
        _receive(frontend, ANSWER_BYTES)
    cpu_before = process_cpu_seconds(os.getpid()) + process_cpu_seconds(pid)
    started = time.perf_counter()
    for _ in range(round_trips):
        frontend.sendall(image)
        _receive(frontend, ANSWER_BYTES)
    elapsed = time.perf_counter() - started
    cpu = process_cpu_seconds(os.getpid()) + process_cpu_seconds(pid) - cpu_before
    frontend.close()
    os.waitpid(pid, 0)
    return {
        "round_trips": round_trips,
        "wall_us_per_round_trip": 1e6 * elapsed / round_trips,
        "cpu_us_per_round_trip": 1e6 * cpu / round_trips,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.handoff_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=20_000, help="images handed over and answered")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.round_trips < 1:
        parser.error("--round-trips must be at least 1")
    result = measure(args.round_trips)
    print(
        f"{result['round_trips']:,} round trips: {result['wall_us_per_round_trip']:.1f} us each, "
        f"{result['cpu_us_per_round_trip']:.1f} us of CPU (both processes)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
