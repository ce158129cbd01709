"""The tests' network guard (pyproject's pytest-socket options): no test reaches past this machine."""

import socket

import pytest
from pytest_socket import SocketConnectBlockedError


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_only_this_machine_can_be_reached(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(SocketConnectBlockedError):
        s.settimeout(2)  # without the guard: a timeout or "unreachable", and the test fails
        s.connect(("10.255.255.1", 80))  # refused before any packet leaves
    with socket.create_server(("127.0.0.1", 0)) as server:  # loopback TCP: gloo, the fake W&B server
        socket.create_connection(server.getsockname(), timeout=5).close()
    with socket.socket(socket.AF_UNIX) as server:  # Unix sockets: multiprocessing
        server.bind(str(tmp_path / "s"))
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "s"))
