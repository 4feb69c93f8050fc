"""Port picking: one process never hands out the same port twice.

The kernel offers a port again as soon as the probing socket closes. A CI run lost its demo
when the demo picked the fleet's metrics port at start-up and the broker, started next,
was handed the same number. The fake kernel here offers a number again on purpose.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edgeloop.demo.scenario import DemoOptions, Scenario
from edgeloop.infra import ports


class _Kernel:
    """Offers the queued port numbers in order, whether or not they were offered before."""

    def __init__(self, offers: list[int]) -> None:
        self.offers = iter(offers)

    def socket(self, *_args: object) -> _Probe:
        return _Probe(self)


class _Probe:
    def __init__(self, kernel: _Kernel) -> None:
        self.kernel = kernel
        self.port = 0

    def bind(self, address: tuple[str, int]) -> None:
        self.port = next(self.kernel.offers)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass


def _offer(monkeypatch: pytest.MonkeyPatch, numbers: list[int]) -> None:
    fake = _Kernel(numbers)
    monkeypatch.setattr(socket, "socket", fake.socket)


def test_a_port_offered_again_by_the_kernel_is_not_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports, "_handed_out", set(), raising=False)
    _offer(monkeypatch, [41001, 41001, 41001, 41002])
    assert ports.free_port() == 41001
    assert ports.free_port() == 41002


def test_free_ports_are_distinct_from_each_other_and_from_earlier_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports, "_handed_out", set(), raising=False)
    _offer(monkeypatch, [42001, 42001, 42002, 42001, 42002, 42003])
    assert ports.free_ports(2) == [42001, 42002]
    assert ports.free_port() == 42003


def test_a_kernel_that_only_offers_used_ports_is_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports, "_handed_out", {43001}, raising=False)
    _offer(monkeypatch, [43001] * 200)
    with pytest.raises(OSError, match="no free port"):
        ports.free_port()


def test_the_demo_never_gives_a_child_the_brokers_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The order of the failed CI run: the scenario is built, the broker picks its port,
    # then each child gets a metrics port. The kernel offers the same number every time.
    monkeypatch.setattr(ports, "_handed_out", set(), raising=False)
    _offer(monkeypatch, [44001] * 8 + [44002, 44003, 44004, 44005, 44006])
    scenario = Scenario(DemoOptions(home=tmp_path, devices=12), say=lambda _: None)
    broker = ports.free_port()
    children = [scenario.port_for(c) for c in ("bridge", "agents-1", "trainer", "fleet")]
    assert broker == 44001
    assert broker not in children
    assert len(set(children)) == len(children)


def test_picked_ports_can_be_bound_by_a_real_server() -> None:
    picked = ports.free_ports(3)
    assert len(set(picked)) == 3
    for port in picked:
        with socket.socket() as server:
            server.bind((ports.LOOPBACK, port))
            server.listen()
