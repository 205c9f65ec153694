"""Attach the driver to a Ray cluster (or start a local one), with token auth kept on.

Ray 2.60 facts this relies on (checked on this machine):
- Token auth: `ray.init()` (new local cluster) turns it on and writes `~/.ray/auth_token`;
  `ray start --head` turns it on only if a token exists. A client attaching with an *explicit*
  address does not switch token mode on by itself (only `address="auto"` does), so against a token
  cluster it fails after ~20 s with "Unauthenticated". `connect` therefore switches the client to
  token mode whenever a token is available (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`,
  `~/.ray/auth_token`); it never sets `RAY_AUTH_MODE=disabled`.
- `ray.init(address=<host:port with nothing listening>)` retries the GCS for minutes (> 2 min here),
  so `connect` probes the port with a plain socket first.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Self

from ditnas.errors import DitnasError

DEFAULT_PORT = 6379
PROBE_TIMEOUT_S = 5.0
TOKEN_HINT = (
    "if the cluster uses token auth, provide its token via RAY_AUTH_TOKEN=<token>, "
    "RAY_AUTH_TOKEN_PATH=<file> or ~/.ray/auth_token (print it on the head with `ray get-auth-token`)"
)


@dataclass
class RayConnection:
    """The driver's Ray session: where it is attached and what the cluster offers."""

    address: str  # "local" for a cluster this process started
    started_local: bool
    token_auth: bool
    nodes: int
    resources: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        import ray

        ray.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_address(address: str) -> tuple[str, int]:
    """host and port of `host:port`, `ray://host:port` or `[v6]:port` (default port 6379)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [::1]:6379
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host:
        raise DitnasError(f"bad Ray address {address!r}: expected host:port (e.g. 127.0.0.1:6379)")
    try:
        return host, int(port) if port else (10001 if address.startswith("ray://") else DEFAULT_PORT)
    except ValueError:
        raise DitnasError(f"bad Ray address {address!r}: the port {port!r} is not a number") from None


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise DitnasError unless something accepts TCP connections at `address` within `timeout`."""
    host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise DitnasError(
            f"cannot reach the Ray cluster at {address} ({reason}); start one there with "
            f"`ray start --head --port={port}`, fix --ray-address/RAY_ADDRESS, or unset both to run on a local cluster"
        ) from None


def _enable_token_auth_if_available() -> bool:
    """Switch this client to token mode when a token is available and RAY_AUTH_MODE is unset.

    Ray does this itself only for address="auto"; with an explicit address the client would connect
    without a token and a token cluster rejects it. We only ever turn auth on, never off.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # assumption: a future Ray without these internals enables auth everywhere (2.61)
        return False
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the env/HOME may have changed since the last look
    if not loader.has_token(ignore_auth_mode=True):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # refresh the cached RayConfig so this process sees token mode
    return True


LOCAL_START_ATTEMPTS = 2  # assumption: one retry covers a start-up deadline missed under load


def connect(address: str | None = None, *, num_cpus: int | None = None, probe_timeout: float = PROBE_TIMEOUT_S,
            namespace: str = "ditnas") -> RayConnection:
    """Attach to the cluster at `address` (else `RAY_ADDRESS`), or start a local one.

    An unreachable address raises DitnasError within `probe_timeout` seconds (plus Ray's own ~20 s
    when something listens but refuses us, e.g. a missing or wrong auth token).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "local", "auto"):
        probe(address, probe_timeout)  # before touching any existing connection
    if ray.is_initialized():
        ray.shutdown()  # assumption: one connection per driver process; reconnecting replaces it
    if address in (None, "local"):
        for attempt in range(LOCAL_START_ATTEMPTS):
            try:
                # address="local": never silently attach to someone else's `ray start` on this machine
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace=namespace,
                         logging_level="WARNING", log_to_driver=False)
                break
            except Exception as exc:  # noqa: BLE001 - ray raises many types
                # a busy machine can miss Ray's own start-up deadline ("Timed out waiting for file
                # .../gcs_server_port_..."): that one is worth a second try, nothing else is
                if attempt + 1 < LOCAL_START_ATTEMPTS and "Timed out waiting for file" in str(exc):
                    ray.shutdown()
                    continue
                raise DitnasError(f"cannot start a local Ray cluster: {type(exc).__name__}: {first_line(exc)}") from None
        return _describe("local", True)
    token = _enable_token_auth_if_available()
    try:
        ray.init(address=address, namespace=namespace, logging_level="WARNING", log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, RuntimeError, ...
        text = f"{type(exc).__name__} {exc}"
        if "Authentication" in text or "Unauthenticated" in text or "token" in text.lower():
            why = "it requires an auth token and " + ("the one found here was rejected" if token else "none was found here")
        else:
            why = f"{type(exc).__name__}: {first_line(exc)[:200]}"
        raise DitnasError(f"cannot attach to the Ray cluster at {address} ({why}); {TOKEN_HINT}") from None
    return _describe(address, False)


def _describe(address: str, local: bool) -> RayConnection:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return RayConnection(address=address, started_local=local, token_auth=os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
                         or local, nodes=len(alive), resources={k: float(v) for k, v in ray.cluster_resources().items()})


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
