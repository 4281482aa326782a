"""`spf.on_fail: refuse` end to end, against a real DNS server: a message from a domain whose
SPF does not authorize the egress IP is held with 451 4.7.x; one from a passing domain goes."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from tests.support.dns import dns_server
from tests.support.inloop import in_thread
from tests.support.smtp import connect, message

pytestmark = pytest.mark.binaries

ZONES = Path(__file__).parent / "data" / "dns"


@in_thread
def test_on_fail_refuse_holds_the_failing_domain_only(make_loop_relay, upstream, pki, dkim_keys, tmp_path):
    with dns_server(ZONES, tmp_path / "dns") as (host, port):
        relay = make_loop_relay(upstream.port, start=False)
        relay.config["dns"] = {"nameservers": [host], "port": port, "timeout": "2s"}
        relay.config["spf"] = {"egress_ip": ["192.0.2.10"], "on_fail": "refuse"}
        relay.config["clients"]["users"][0]["senders"] = ["example.com", "example.net"]
        relay.config["dkim"]["keys"].append(
            {"domain": "example.net", "selector": "s1", "key": f"file://{dkim_keys.rsa_path}"}
        )
        relay.start()
        deadline = time.monotonic() + 20
        while (
            relay.metric("relay_spf_egress_pass", domain="example.net") != 0
            or relay.metric("relay_spf_egress_pass", domain="example.com") != 1
        ):
            assert time.monotonic() < deadline, "the posture check did not run"
            time.sleep(0.2)

        client = connect(relay, pki)
        client.sendmail("app@example.com", ["u@example.org"], message())
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("app@example.net", ["u@example.org"], message(frm="app@example.net"))
        assert err.value.smtp_code == 451
        assert err.value.smtp_error.startswith(b"4.7.23 SPF for example.net does not authorize egress IP 192.0.2.10")
        assert [m.mail_from for m in upstream.wait_for(1)] == ["app@example.com"]
        assert relay.metric("relay_messages_rejected_total", reason="spf_egress") == 1
