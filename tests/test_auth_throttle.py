"""AUTH brute force across connections (issue 12, item 6): failures counted per client
address and per username; a throttled address is refused before any password check, a
throttled username lets only already-verified credentials through; the legitimate
application keeps logging in meanwhile."""

from __future__ import annotations

import base64
import smtplib

from tests.support.config import APP_PASSWORD
from tests.support.inloop import in_thread
from tests.support.smtp import connect


def auth_plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def session_from(relay, pki, address: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20, source_address=(address, 0))
    client.starttls(context=pki.client_context())
    client.ehlo("attacker.test")
    return client


def guesses(relay, pki, address: str, count: int, user: str = "app") -> list[int]:
    """`count` wrong passwords from `address`, one connection each (the per-session limit
    is not what is tested here)."""
    codes: list[int] = []
    for n in range(count):
        client = session_from(relay, pki, address)
        codes.append(client.docmd("AUTH", auth_plain(user, f"guess-{n}"))[0])
        client.close()
    return codes


def hashes(relay) -> float:
    return relay.metric("relay_auth_hash_verifications_total")


@in_thread
def test_an_address_that_keeps_failing_is_refused_before_any_password_check(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    codes = guesses(relay, pki, "127.0.0.2", 30)
    # 5 failures (default per_address), then 421 4.7.0 without a password check.
    assert codes[:5] == [535] * 5 and set(codes[5:]) == {421}
    assert hashes(relay) == 5
    assert relay.metric("relay_auth_throttled_total", scope="address") == 25
    assert relay.metric("relay_auth_attempts_total", result="auth_throttled") == 25
    # The application on another address is not affected.
    connect(relay, pki).quit()
    assert relay.metric("relay_auth_attempts_total", result="success") == 1


@in_thread
def test_guesses_for_a_username_from_many_addresses_cost_no_hash_once_it_is_throttled(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    connect(relay, pki).quit()  # the application logged in before the attack
    assert hashes(relay) == 1
    codes = []
    for host in range(10, 40):  # one guess from each of 30 addresses: no address limit reached
        codes += guesses(relay, pki, f"127.0.0.{host}", 1)
    assert codes == [535] * 30
    # 10 failures (default per_username) ran scrypt; the 20 after them did not.
    assert hashes(relay) == 1 + 10
    assert relay.metric("relay_auth_throttled_total", scope="username") == 20
    # The application, with its (verified) password, still logs in, with no hash computed.
    client = connect(relay, pki)
    client.sendmail("app@example.com", ["u@example.net"], b"From: app@example.com\r\nSubject: s\r\n\r\nhi\r\n")
    client.quit()
    assert hashes(relay) == 11
    assert relay.metric("relay_auth_attempts_total", result="success") == 2
    assert len(upstream.wait_for(1)) == 1


@in_thread
def test_auth_throttle_limits_are_configurable_and_tracked_state_is_bounded(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["auth_throttle"] = {"per_address": 2, "max_tracked": 100}
    relay.start()
    assert guesses(relay, pki, "127.0.0.2", 3) == [535, 535, 421]
    for host in range(10, 130):
        guesses(relay, pki, f"127.0.1.{host}", 1, user=f"user{host}")
    assert relay.metric("relay_auth_throttle_tracked", scope="address") == 100
    assert relay.metric("relay_auth_throttle_tracked", scope="username") == 100
    assert APP_PASSWORD  # the application's own login still works:
    connect(relay, pki).quit()
