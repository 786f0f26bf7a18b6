"""The identify throttle alone (messaging_server/server/throttle.py), on an injected clock."""

from __future__ import annotations

import logging
from typing import List, Tuple

import pytest

from messaging_server.server.throttle import (
    DEFAULT_EXEMPT,
    LOG_INTERVAL_S,
    LOG_LINES_PER_ADDRESS,
    MAX_LOG_LINES_PER_INTERVAL,
    REFILL_PERIOD_S,
    IdentifyThrottle,
    Throttled,
    address_key,
    parse_exempt,
)

PEER = "198.51.100.7:4000"
ADDRESS = "198.51.100.7"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(failures: int = 3, new: int = 5, exempt: str = DEFAULT_EXEMPT,
         max_addresses: int = 100) -> Tuple[IdentifyThrottle, Clock]:
    clock = Clock()
    return IdentifyThrottle(failures, new, exempt, clock, max_addresses), clock


def failures_admitted(throttle: IdentifyThrottle, count: int, address: str = ADDRESS) -> int:
    admitted = 0
    for _ in range(count):
        try:
            throttle.failed(address, PEER, "client id 1 with a secret")
            admitted += 1
        except Throttled:
            pass
    return admitted


def test_failures_are_refused_after_the_burst_with_the_wait_in_whole_seconds() -> None:
    throttle, clock = make(failures=3, new=100)
    assert failures_admitted(throttle, 3) == 3
    with pytest.raises(Throttled) as refused:
        throttle.failed(ADDRESS, PEER, "client id 1 with a secret")
    # 3 per minute: one token every 20 s.
    assert str(refused.value) == "too many failed identifications from your address, try again in 20 s"
    assert refused.value.retry_after == 20
    clock.now += 19.5
    with pytest.raises(Throttled, match=r"try again in 1 s$"):
        throttle.failed(ADDRESS, PEER, "x")
    clock.now += 0.5
    assert failures_admitted(throttle, 2) == 1  # one token came back, not two
    assert throttle.throttled == 3


def test_refused_attempts_do_not_push_the_refill_back() -> None:
    throttle, clock = make(failures=3, new=100)
    failures_admitted(throttle, 3)
    for _ in range(50):  # hammering while refused
        clock.now += 0.1
        failures_admitted(throttle, 1)
    clock.now += REFILL_PERIOD_S / 3 - 5.0  # 20 s after the burst in all
    assert failures_admitted(throttle, 1) == 1


def test_a_full_period_refills_the_bucket_but_never_beyond_its_capacity() -> None:
    throttle, clock = make(failures=3, new=100)
    failures_admitted(throttle, 3)
    clock.now += 10 * REFILL_PERIOD_S
    assert failures_admitted(throttle, 10) == 3


def test_new_clients_have_their_own_larger_budget_and_failures_use_it_too() -> None:
    throttle, _ = make(failures=3, new=5)
    for _ in range(3):
        throttle.new_client(ADDRESS, PEER)
    assert failures_admitted(throttle, 3) == 2  # 5 new clients in all: NONE x3 + 2 failures
    with pytest.raises(Throttled, match=r"^too many new clients from your address, try again in 12 s$"):
        throttle.new_client(ADDRESS, PEER)


def test_addresses_are_throttled_apart() -> None:
    throttle, _ = make(failures=2, new=100)
    assert failures_admitted(throttle, 5, "198.51.100.7") == 2
    assert failures_admitted(throttle, 5, "198.51.100.8") == 2


def test_zero_turns_a_limit_off() -> None:
    throttle, _ = make(failures=0, new=0)
    assert failures_admitted(throttle, 1000) == 1000
    for _ in range(1000):
        throttle.new_client(ADDRESS, PEER)
    only_new, _ = make(failures=0, new=4)
    assert failures_admitted(only_new, 10) == 4


def test_exempt_addresses_are_never_throttled_nor_remembered() -> None:
    throttle, _ = make(failures=1, new=1)
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert failures_admitted(throttle, 20, address) == 20
    assert len(throttle) == 0
    assert failures_admitted(throttle, 5, "127.0.0.2") == 1  # only 127.0.0.1 itself
    everyone, _ = make(failures=1, new=1, exempt="none")
    assert failures_admitted(everyone, 5, "127.0.0.1") == 1
    lb, _ = make(failures=1, new=1, exempt="10.0.0.0/8, 2001:db8::/32")
    assert failures_admitted(lb, 5, "10.1.2.3") == 5
    assert failures_admitted(lb, 5, "2001:db8::5") == 5
    assert failures_admitted(lb, 5, "127.0.0.1") == 1


def test_address_keys() -> None:
    assert address_key("198.51.100.7") == "198.51.100.7"
    assert address_key("::ffff:198.51.100.7") == "198.51.100.7"  # dual-stack socket
    # One IPv6 host picks from a whole /64: all of it is one key.
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not-an-ip") == "not-an-ip"
    assert address_key("127.0.0.1", parse_exempt(DEFAULT_EXEMPT)) is None


def test_parse_exempt() -> None:
    assert [str(n) for n in parse_exempt("127.0.0.1, ::1,10.0.0.0/8,")] == \
        ["127.0.0.1/32", "::1/128", "10.0.0.0/8"]
    assert parse_exempt("NONE") == ()
    with pytest.raises(ValueError, match="'bogus' is not an IP address or network"):
        parse_exempt("127.0.0.1,bogus")


def test_the_table_is_capped_and_forgets_the_least_recently_seen() -> None:
    throttle, _ = make(failures=1, new=100, max_addresses=3)
    for i in range(1, 4):
        failures_admitted(throttle, 1, f"198.51.100.{i}")
    failures_admitted(throttle, 1, "198.51.100.1")  # seen again: now the most recent
    failures_admitted(throttle, 1, "198.51.100.4")  # evicts .2, the least recently seen
    assert len(throttle) == 3
    assert failures_admitted(throttle, 1, "198.51.100.1") == 0  # remembered: still empty
    assert failures_admitted(throttle, 1, "198.51.100.2") == 1  # forgotten: a full bucket
    many, _ = make(max_addresses=50)
    for i in range(10_000):
        many.new_client(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", PEER)
    assert len(many) == 50


def warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_warnings_are_limited_per_address_and_summed_up_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="messaging_server")
    throttle, clock = make(failures=1000, new=1000)
    failures_admitted(throttle, 500)
    rejected = f"{PEER} presented client id 1 with a secret: rejected"
    assert warnings(caplog) == [rejected] * LOG_LINES_PER_ADDRESS
    clock.now += LOG_INTERVAL_S
    caplog.clear()
    failures_admitted(throttle, 500)
    lines = warnings(caplog)
    assert len(lines) == LOG_LINES_PER_ADDRESS + 1  # the summary comes with the interval's first event
    assert lines[1].startswith(f"{500 - LOG_LINES_PER_ADDRESS} more warnings about failed or "
                                "throttled identifications not logged in the last 60 s")


def test_refusals_are_logged_within_the_same_budget(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="messaging_server")
    throttle, _ = make(failures=1, new=100)
    failures_admitted(throttle, 100)
    assert warnings(caplog) == [
        f"{PEER} presented client id 1 with a secret: rejected",
        f"{PEER} throttled: too many failed identifications from your address, try again in 60 s",
        f"{PEER} throttled: too many failed identifications from your address, try again in 60 s",
    ]


def test_many_addresses_cannot_flood_the_log_either(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="messaging_server")
    throttle, _ = make(failures=100, new=100)
    for i in range(1000):
        failures_admitted(throttle, 1, f"10.0.{i // 256}.{i % 256}")
    assert len(warnings(caplog)) == MAX_LOG_LINES_PER_INTERVAL


def test_new_clients_alone_are_not_logged_by_the_throttle(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="messaging_server")
    throttle, _ = make(failures=1, new=2)
    throttle.new_client(ADDRESS, PEER)
    throttle.new_client(ADDRESS, PEER)
    assert warnings(caplog) == []
    with pytest.raises(Throttled):
        throttle.new_client(ADDRESS, PEER)
    assert warnings(caplog) == [f"{PEER} throttled: too many new clients from your address, "
                                "try again in 30 s"]
