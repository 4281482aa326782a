"""analyze_record(): lookup counting through include/redirect, smells and problems."""

from __future__ import annotations

from relay.dns.resolver import DnsAnswer, DnsTemporaryError
from relay.spf import analyze_record


class FakeDns:
    """TXT records by name; names listed in `broken` time out."""

    def __init__(self, txt: dict[str, list[str]], broken: tuple[str, ...] = ()) -> None:
        self.txt = txt
        self.broken = broken
        self.queries: list[tuple[str, str]] = []

    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        self.queries.append((name, rdtype))
        if name in self.broken:
            raise DnsTemporaryError(f"{rdtype} {name}: timed out")
        if rdtype != "TXT" or name not in self.txt:
            return DnsAnswer((), nxdomain=name not in self.txt)
        return DnsAnswer(tuple(t.encode() for t in self.txt[name]))


async def test_counts_lookups_through_include_chain() -> None:
    dns = FakeDns(
        {
            "example.com": ["v=spf1 a mx include:_spf.example.com ip4:192.0.2.0/24 -all"],
            "_spf.example.com": ["v=spf1 include:_b.example.com exists:%{i}.x.example.com ~all"],
            "_b.example.com": ["v=spf1 ptr:example.com a:mail.example.com -all"],
            "unrelated.example.com": ["v=spf1 -all"],
        }
    )
    report = await analyze_record(dns, "example.com")
    # a, mx, include (3) + include, exists (2) + ptr, a (2); ip4/all cost nothing.
    assert report.lookups == 7
    assert not report.over_limit
    assert report.all_qualifier == "-"
    assert report.records_found == 1
    assert report.record == "v=spf1 a mx include:_spf.example.com ip4:192.0.2.0/24 -all"
    assert report.length == len(report.record)
    assert report.problem == ""
    assert "ptr mechanism is deprecated (RFC 7208 §5.5)" in report.smells
    assert ("unrelated.example.com", "TXT") not in dns.queries


async def test_same_include_twice_counts_twice() -> None:
    dns = FakeDns(
        {
            "example.com": ["v=spf1 include:a.example.com include:a.example.com -all"],
            "a.example.com": ["v=spf1 a mx -all"],
        }
    )
    report = await analyze_record(dns, "example.com")
    assert report.lookups == 6  # evaluation would walk a.example.com twice (§4.6.4)


async def test_over_the_limit() -> None:
    chain = {f"s{i}.example.com": [f"v=spf1 include:s{i + 1}.example.com"] for i in range(12)}
    chain["s12.example.com"] = ["v=spf1 -all"]
    report = await analyze_record(FakeDns(chain), "s0.example.com")
    assert report.lookups == 12
    assert report.over_limit
    assert "permerror" in report.problem
    assert any("over the limit" in s for s in report.smells)


async def test_include_loop_is_named_and_over_limit() -> None:
    dns = FakeDns(
        {
            "a.example.com": ["v=spf1 include:b.example.com -all"],
            "b.example.com": ["v=spf1 include:a.example.com -all"],
        }
    )
    report = await analyze_record(dns, "a.example.com")
    assert report.over_limit  # evaluation follows the loop until the limit
    assert report.lookups == 2 and len(dns.queries) == 2  # the analysis stops where it closes
    assert report.problem == (
        "include:a.example.com loops: a.example.com -> b.example.com -> a.example.com (permerror)"
    )


async def test_plus_all_and_question_all_smells() -> None:
    plus = await analyze_record(FakeDns({"example.com": ["v=spf1 +all"]}), "example.com")
    assert plus.all_qualifier == "+"
    assert "+all authorizes the whole internet" in plus.smells
    bare = await analyze_record(FakeDns({"example.com": ["v=spf1 all"]}), "example.com")
    assert bare.all_qualifier == "+"
    question = await analyze_record(FakeDns({"example.com": ["v=spf1 mx ?all"]}), "example.com")
    assert question.all_qualifier == "?"
    assert "?all makes SPF meaningless" in question.smells
    assert question.lookups == 1


async def test_redirect_is_followed_for_the_effective_all() -> None:
    dns = FakeDns(
        {
            "example.com": ["v=spf1 ip4:192.0.2.1 redirect=_spf.example.net"],
            "_spf.example.net": ["v=spf1 mx ~all"],
        }
    )
    report = await analyze_record(dns, "example.com")
    assert report.lookups == 2  # redirect + mx
    assert report.all_qualifier == "~"


async def test_redirect_ignored_when_all_present() -> None:
    dns = FakeDns({"example.com": ["v=spf1 -all redirect=_spf.example.net"]})
    report = await analyze_record(dns, "example.com")
    assert report.lookups == 0
    assert report.all_qualifier == "-"
    assert ("_spf.example.net", "TXT") not in dns.queries


async def test_multiple_records() -> None:
    dns = FakeDns({"example.com": ["v=spf1 -all", "v=spf1 ~all", "google-site-verification=x"]})
    report = await analyze_record(dns, "example.com")
    assert report.records_found == 2
    assert "multiple SPF records (permerror)" in report.smells
    assert "permerror" in report.problem


async def test_no_record() -> None:
    report = await analyze_record(FakeDns({"example.com": ["hello"]}), "example.com")
    assert report.record is None
    assert report.records_found == 0
    assert report.lookups == 0
    assert report.all_qualifier is None
    assert report.problem == ""


async def test_syntax_error_is_a_problem() -> None:
    report = await analyze_record(FakeDns({"example.com": ["v=spf1 ip4:192.0.2 -all"]}), "example.com")
    assert "permerror" in report.problem
    assert report.records_found == 1


async def test_missing_include_target_is_a_problem() -> None:
    report = await analyze_record(FakeDns({"example.com": ["v=spf1 include:gone.example.net -all"]}), "example.com")
    assert report.lookups == 1
    assert "gone.example.net" in report.problem
    assert "permerror" in report.problem


async def test_macro_include_is_counted_but_not_followed() -> None:
    dns = FakeDns(
        {
            "example.com": ["v=spf1 include:%{l}.users.example.com include:_x.%{d} -all"],
            "_x.example.com": ["v=spf1 a -all"],
        }
    )
    report = await analyze_record(dns, "example.com")
    assert report.lookups == 3  # two includes + the a behind %{d}, which can be expanded
    assert report.problem == ""


async def test_temperror_is_reported() -> None:
    top = await analyze_record(FakeDns({}, broken=("example.com",)), "example.com")
    assert top.problem.startswith("temperror")
    nested = await analyze_record(
        FakeDns({"example.com": ["v=spf1 include:slow.example.net -all"]}, broken=("slow.example.net",)),
        "example.com",
    )
    assert "temperror" in nested.problem


async def test_long_record_smell() -> None:
    record = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(30)) + " -all"
    report = await analyze_record(FakeDns({"example.com": [record]}), "example.com")
    assert report.length == len(record) > 255
    assert any("255 bytes" in s for s in report.smells)
    assert report.lookups == 0
