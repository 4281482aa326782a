"""Sending limits, one stage at a time: rates, the policy from the config, and the replies
the limiter gives (on real local counters in a temporary directory)."""

from __future__ import annotations

import pytest

from relay.config.load import settings_from_mapping
from relay.limits.limiter import LIMIT_REFUSALS, Limiter, LimitExceeded
from relay.limits.local import LocalCounters
from relay.limits.rules import LimitPolicy, Rate, parse_rate


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [
        ("10/s", 10, 1),
        ("600/m", 600, 60),
        ("600/min", 600, 60),
        ("1000/h", 1000, 3600),
        ("50000/d", 50000, 86400),
        ("100/5m", 100, 300),
        (" 7 / 2s ", 7, 2),
        ("3600/Hour", 3600, 3600),
    ],
)
def test_rates(text, count, seconds):
    assert parse_rate(text) == Rate(count, seconds)


@pytest.mark.parametrize("text", ["10/x", "10", "/s", "0/s", "-1/s", "1.5/s", "ten/s", "10/0s", ""])
def test_malformed_rates(text):
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("14/s", 14.0), ("0.5/s", 0.5), ("600/minute", 10.0), ("86400/d", 1.0), ("100/5m", 100 / 300), (3, 3.0)],
)
def test_upstream_max_rate_takes_the_same_grammar_as_the_limits(text, per_second):
    """One rate grammar in the config: `upstream.max_rate` used to refuse `/d` and `/5m`,
    which `limits.*.rate` took."""
    assert _with_max_rate(text).upstream[0].max_rate == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["fast", "10/x", "0/s", "/s", "1/0s"])
def test_upstream_max_rate_refuses_what_is_not_a_rate(text):
    with pytest.raises(Exception, match="max_rate"):
        _with_max_rate(text)


def _with_max_rate(rate: object):
    listener = {"name": "side", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}
    upstream = {"host": "127.0.0.1", "port": 2526, "tls": "none", "max_rate": rate}
    return settings_from_mapping({"listeners": [listener], "upstream": [upstream]}, offline=True)


def test_rate_prints_as_written():
    assert [str(parse_rate(t)) for t in ("10/s", "600/m", "1000/h", "5/d", "100/5m")] == [
        "10/s",
        "600/m",
        "1000/h",
        "5/d",
        "100/300s",
    ]


def settings(limits: dict, users=("app", "billing", "batch")):
    return settings_from_mapping(
        {
            "listeners": [{"name": "side", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
            "upstream": {"host": "smtp.example.com"},
            "clients": {
                "users": [{"username": u, "password": f"env://{u.upper()}", "senders": ["example.com"]} for u in users]
            },
            "limits": limits,
        }
    )


def test_policy_defaults_and_overrides():
    policy = LimitPolicy(
        settings(
            {
                "users": {
                    "rate": "10/s",
                    "burst": 50,
                    "daily": 50000,
                    "billing": {"daily": 200000},  # the rest inherited
                    "batch": {"rate": "100/s", "daily": None},
                },  # own rate (own burst), no daily
                "domains": {"Example.COM": {"daily_recipients": 100000}},
            }
        ).limits
    )
    app = policy.for_user("app")
    assert (str(app.rate), app.burst, app.daily, app.daily_recipients) == ("10/s", 50, 50000, None)
    billing = policy.for_user("billing")
    assert (str(billing.rate), billing.burst, billing.daily) == ("10/s", 50, 200000)
    batch = policy.for_user("batch")
    assert (str(batch.rate), batch.burst, batch.daily) == ("100/s", 100, None)
    assert policy.for_user(None) is None  # unauthenticated: only domain limits apply
    assert policy.for_domain("example.com").daily_recipients == 100000
    assert policy.for_domain("EXAMPLE.com") == policy.for_domain("example.com")
    assert policy.for_domain("other.example") is None
    assert [str(e) for e, _ in policy.with_daily_quota(["app", "billing", "batch"])] == [
        "user app",
        "user billing",
        "domain example.com",
    ]


def test_rate_without_burst_lets_its_count_go_at_once():
    policy = LimitPolicy(settings({"users": {"rate": "600/m"}}).limits)
    assert policy.for_user("app").burst == 600


@pytest.fixture
async def counters(tmp_path):
    counters = LocalCounters(tmp_path / "limits")
    yield counters
    await counters.close()


async def test_rate_refuses_at_rcpt_with_451_naming_the_limit(counters):
    limiter = Limiter(LimitPolicy(settings({"users": {"rate": "1/h", "burst": 1}}).limits), counters)
    limiter.check_recipient("app", 0)
    reservation = await limiter.reserve("app", "example.com", 1)
    before = LIMIT_REFUSALS.labels("user", "app")._value.get()
    with pytest.raises(LimitExceeded) as refused:
        limiter.check_recipient("app", 0)
    assert (
        str(refused.value.reply)
        == "451 4.7.0 Sending limit reached: sending rate of user app (1/h, burst 1), try again later"
    )
    assert refused.value.limit == "user:app:rate"
    assert refused.value.label == "limit"
    assert LIMIT_REFUSALS.labels("user", "app")._value.get() == before + 1
    # A message that was not delivered gives its token back.
    await reservation.give_back()
    limiter.check_recipient("app", 0)


async def test_daily_recipient_quota_at_rcpt_is_452_and_at_data_451(counters):
    limiter = Limiter(LimitPolicy(settings({"users": {"daily_recipients": 3}}).limits), counters)
    await limiter.reserve("app", "example.com", 2)
    limiter.check_recipient("app", 0)  # the 3rd recipient of the day fits
    with pytest.raises(LimitExceeded) as refused:
        limiter.check_recipient("app", 1)  # a 4th does not
    assert str(refused.value.reply) == (
        "452 4.5.3 Sending limit reached: daily recipient quota of user app "
        "(3 recipients in 24 h), send to the other recipients later"
    )
    with pytest.raises(LimitExceeded) as refused:
        await limiter.reserve("app", "example.com", 2)
    assert refused.value.reply.code == 451 and refused.value.reply.enhanced == "4.7.0"


async def test_a_domain_refusal_gives_no_figures(counters):
    limiter = Limiter(LimitPolicy(settings({"domains": {"example.com": {"daily": 1}}}).limits), counters)
    limiter.check_recipient("app", 0)  # nothing on the user
    await limiter.reserve("billing", "example.com", 1)
    with pytest.raises(LimitExceeded) as refused:
        await limiter.reserve("app", "Example.com", 1)
    assert (
        str(refused.value.reply)
        == "451 4.7.0 Sending limit reached: daily message quota of domain example.com, try again later"
    )
    assert "1 of 1" in refused.value.reason  # the figures go to the log only
    assert refused.value.limit == "domain:example.com:daily"


async def test_spool_leaves_domain_limits_to_the_queue(counters):
    limiter = Limiter(LimitPolicy(settings({"domains": {"example.com": {"daily": 1}}}).limits), counters)
    await limiter.reserve("app", "example.com", 1)
    await limiter.reserve("app", "example.com", 1, domain_limits=False)  # not refused


async def test_a_queue_is_told_when_to_try_again_never_refused(counters):
    limiter = Limiter(LimitPolicy(settings({"domains": {"example.com": {"rate": "1/h", "burst": 1}}}).limits), counters)
    first = await limiter.pace_delivery("example.com", 3)
    assert not isinstance(first, float)
    wait = await limiter.pace_delivery("example.com", 3)
    assert isinstance(wait, float) and 3000 < wait <= 3600
    assert first is not None and not isinstance(first, float)
    await limiter.give_back_delivery("example.com", first)  # that delivery failed: its slot is free again
    assert not isinstance(await limiter.pace_delivery("example.com", 3), float)


async def test_unlimited_users_cost_nothing(counters):
    limiter = Limiter(LimitPolicy(settings({"users": {"batch": {"daily": 5}}}).limits), counters)
    limiter.check_recipient("app", 0)
    reservation = await limiter.reserve("app", "example.com", 1)
    assert reservation._taken is None


async def test_a_rate_counting_recipients_paces_a_many_recipient_message(tmp_path):
    """The domain's limits mirror an SES account (1 recipient a second, `rate_counts:
    recipients`): a message to 50 recipients used to pass on one token."""
    from relay.config.schema import LimitsSettings

    settings = LimitsSettings.model_validate(
        {"domains": {"example.com": {"rate": "1/s", "burst": 1, "rate_counts": "recipients", "daily": 200}}}
    )
    limiter = Limiter(LimitPolicy(settings), LocalCounters(tmp_path / "limits"))
    try:
        assert isinstance(await limiter.pace_delivery("example.com", 50), dict)
        wait = await limiter.pace_delivery("example.com", 1)
        assert isinstance(wait, float) and wait > 45  # the 50 recipients are paid for first
    finally:
        await limiter.counters.close()
