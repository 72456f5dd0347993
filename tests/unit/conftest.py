"""The unit tier runs no process and opens no socket: what needs either is an integration test.
Every unit test runs with both refused, so a test that needs them fails here, saying so."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest


def _refuse(what: str) -> Any:
    def refused(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise AssertionError(f"a unit test may not {what}: make it an integration test (tests/integration)")

    return refused


@pytest.fixture(autouse=True)
def no_processes_or_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse("start a process"))
    for method in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, method, _refuse(f"open a network socket ({method})"))
    yield
