"""The network guard: tests and notebook kernels cannot reach another machine."""

import socket
import subprocess
import sys

import pytest

from dpo_teach.offline import NetworkBlockedError, offline_environment


def test_guard_is_on_in_the_test_process():
    with pytest.raises(NetworkBlockedError):
        socket.create_connection(("example.com", 80), timeout=1)
    with pytest.raises(NetworkBlockedError):
        socket.socket().connect(("93.184.216.34", 80))


def test_loopback_stays_open():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()


def test_child_processes_start_offline():
    code = ("import socket\n"
            "try:\n    socket.create_connection(('example.com', 80), timeout=1)\n"
            "except ConnectionError as e:\n    print('blocked', type(e).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], env=offline_environment(), capture_output=True, text=True)
    assert "blocked NetworkBlockedError" in out.stdout, out.stderr
    assert offline_environment()["HF_HUB_OFFLINE"] == "1"
