"""Reaching a fleet from one client: which target strings name several replicas, and the service config that
spreads calls over them.

A gRPC channel resolves its target to addresses and, by default (`pick_first`), sends every call down one
connection to the first. A client of several replicas therefore names all of them, as a list (`a:50051,b:50051`)
or a DNS name with one address per replica (`dns:///mnist-serve-headless.NS.svc.cluster.local:50051`: a headless
Kubernetes Service), and uses `round_robin`, retrying UNAVAILABLE (a replica draining or gone) on another. The
server ends each connection after `--max-connection-age`, so a DNS client re-resolves and reaches replicas added
since it connected. `server/deploy/kubernetes/client-service-config.json` is this same config, for other clients.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "mnist.v1.Classifier"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


RECONNECT_BACKOFF_MAX_MS = 2000
# gRPC's DNS resolver asks again when a connection ends, but by default at most every 30 s: a client would reach a
# replica added to a headless Service's name only that much after the server ended its connection.
DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS = 1000


def is_fleet(servers: str) -> bool:
    """Whether `servers` names replicas to balance over: a comma-separated list, or a resolver URI (dns:///...)."""
    return "," in servers or "://" in servers


def channel_target(servers: str) -> str:
    """The gRPC target for `servers`: one HOST:PORT or a URI as given; a list HOST:PORT,HOST:PORT,... as an `ipv4:`
    (or `ipv6:`) list of every address of every host, resolved once now (IPv4 when every host has one). ValueError
    naming what cannot be used."""
    if not is_fleet(servers) or "://" in servers:
        return servers
    hosts = [_resolve(part.strip()) for part in servers.split(",") if part.strip()]
    if not hosts:
        raise ValueError(f"no server in {servers!r}: give HOST:PORT[,HOST:PORT...] or dns:///NAME:PORT")
    for family in ("ipv4", "ipv6"):
        if all(host[family] for host in hosts):
            addresses = dict.fromkeys(address for host in hosts for address in host[family])
            return f"{family}:" + ",".join(addresses)
    raise ValueError(f"{servers!r} mixes IPv4 and IPv6 addresses; give one family, or a dns:/// name")


def channel_options(servers: str) -> list[tuple[str, Any]]:
    """Channel arguments for `servers`: for a fleet, round-robin over every address with retries on UNAVAILABLE, a
    short reconnect backoff, and the first host as the authority (the name TLS checks) rather than an address; for
    a DNS name, re-resolution as often as every second; none for one server."""
    if not is_fleet(servers):
        return []
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        # A replica that is down is tried again at least this often (gRPC's default backs off to 2 minutes): one
        # that comes back, or a new one at a listed address, takes calls within seconds.
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]
    first = servers.split(",")[0].strip()
    if "://" not in first:
        options.append(("grpc.default_authority", first))
    if servers.startswith("dns:"):
        options.append(("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS))
    return options


def _resolve(server: str) -> dict[str, list[str]]:
    """HOST:PORT ([V6]:PORT) -> its addresses by family, written as gRPC's address lists write them."""
    host, separator, port = server.rpartition(":")
    if not separator or not port.isdigit() or not host:
        raise ValueError(f"{server!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            resolved = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve {host!r}: {exc.strerror}") from None
        addresses = [ipaddress.ip_address(entry[4][0]) for entry in resolved]
    return {
        "ipv4": [f"{a}:{port}" for a in addresses if a.version == 4],
        "ipv6": [f"[{a}]:{port}" for a in addresses if a.version == 6],
    }
