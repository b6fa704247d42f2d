"""A network guard: while it is on, any attempt to open a connection off this machine fails.

Tests and notebook executions turn it on (the course must run with the network cut off); a
learner never needs it. Loopback stays open, because Jupyter kernels talk to their clients over it.
"""

from __future__ import annotations

import ipaddress
import os
import socket

__all__ = ["GUARD_ENV", "SITE_DIR", "NetworkBlockedError", "block_network", "unblock_network",
           "offline_environment"]

GUARD_ENV = "DPO_TEACH_BLOCK_NETWORK"
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_offline_site")

_original = {}


class NetworkBlockedError(ConnectionError):
    """Raised when code tries to reach another machine while the guard is on."""


def _is_local(host) -> bool:
    if host in (None, "", "localhost", "localhost.localdomain"):
        return True
    if isinstance(host, bytes):
        host = host.decode()
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, host) -> None:
    raise NetworkBlockedError(f"network access blocked ({what} {host!r}): the course runs offline")


def block_network() -> None:
    """Make every non-loopback connection and name lookup raise NetworkBlockedError."""
    if _original:
        return
    _original["connect"] = socket.socket.connect
    _original["connect_ex"] = socket.socket.connect_ex
    _original["getaddrinfo"] = socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _refuse("connect to", address[0])
        return _original["connect"](self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _refuse("connect to", address[0])
        return _original["connect_ex"](self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            _refuse("look up", host)
        return _original["getaddrinfo"](host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo


def unblock_network() -> None:
    """Undo block_network()."""
    if not _original:
        return
    socket.socket.connect = _original.pop("connect")
    socket.socket.connect_ex = _original.pop("connect_ex")
    socket.getaddrinfo = _original.pop("getaddrinfo")


def offline_environment(env: dict | None = None) -> dict:
    """A copy of `env` (default os.environ) in which Python processes start with the guard on.

    The folder SITE_DIR holds a sitecustomize module that calls block_network() at interpreter
    start when DPO_TEACH_BLOCK_NETWORK=1, so notebook kernels started with this environment are
    offline from their first line. The Hugging Face libraries are told to stay offline too.
    """
    env = dict(os.environ if env is None else env)
    env[GUARD_ENV] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if SITE_DIR not in paths:
        env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, *paths])
    return env
