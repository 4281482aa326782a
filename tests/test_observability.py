"""The observability contract: the alert rules and the Grafana dashboard in deploy/grafana/
against promtool, a real Prometheus scraping the real relay, and the relay's real scrape.

The dashboard and rules may use only metric names the relay exports: every name they use
must appear in a scrape (as a `# TYPE` line at least), and every expression, with Grafana's
template variables filled in, must evaluate without error in Prometheus.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.support.config import APP_PASSWORD, relay_config
from tests.support.inloop import in_thread
from tests.support.procs import free_port, require_binary, running
from tests.support.relayproc import RelayProcess, split_bind
from tests.support.smtp import message, submit
from tests.support.upstream import Upstream

pytestmark = pytest.mark.binaries

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "relay-dashboard.json"
ALERTS = GRAFANA / "relay-alerts.yaml"
ALERT_TESTS = GRAFANA / "tests" / "relay-alerts-test.yaml"

EXPECTED_ALERTS = {
    "RelayUpstreamErrorRatioHigh",
    "RelayProxyFailing",
    "RelaySpfEgressNotPassing",
    "RelayDkimDnsMismatch",
    "RelaySecretRefreshStale",
    "RelayDown",
    "RelayNotReady",
    "RelayUpstreamTokenRefused",
    "RelayUpstreamTokenEndpointFailing",
    "RelayQueueGrowing",
    "RelayQueueOldestMessageTooOld",
    "RelaySpoolNearlyFull",
    "RelayDkimKeyTooOld",
    "RelayUserNearDailyQuota",
    "RelayLimitsNotShared",
    "RelayLimitsNotCounted",
}
# Panels that must show data once mail has flowed (the others may legitimately be empty:
# no posture gauges without DNS, no key load failures, ...).
CORE_PANELS = {
    "Messages",
    "Rejections by reason",
    "Upstream latency (end of DATA)",
    "DKIM signatures by domain/selector",
    "Active sessions",
    "Sessions",
}
# Grafana's template variables, as Prometheus sees them with "All" selected.
GRAFANA_VARIABLES = {"instance": ".*", "upstream": ".*", "domain": ".*", "__rate_interval": "1m"}
PROMETHEUS_MADE = {"up"}  # series Prometheus makes itself, not scraped from the relay

_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)\s*$", re.DOTALL)
_METRIC_NAME = re.compile(r"\b(relay_[a-z0-9_]+)\b")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# -- the artifacts ------------------------------------------------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_alerts() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL as Grafana would send it with every variable set to All)."""
    out = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", fill_variables(target["expr"])))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            out.append((f"variable ${variable['name']}", variable_as_promql(variable["query"])))
    return out


def variable_as_promql(query: str | dict) -> str:
    """`label_values(selector, label)` as the PromQL whose result holds those values."""
    text = query["query"] if isinstance(query, dict) else query
    match = _LABEL_VALUES.match(text.strip())
    assert match, f"variable query {text!r} is not label_values(selector, label)"
    selector, label = match.groups()
    assert selector, f"{text!r}: label_values without a selector would list every target's labels"
    return f"count by ({label}) ({fill_variables(selector)})"


def fill_variables(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        assert name in GRAFANA_VARIABLES, f"unknown template variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def alert_queries() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in load_alerts()]


def metric_names(expr: str) -> set[str]:
    return set(_METRIC_NAME.findall(expr))


def exported_families(scrape: str) -> dict[str, str]:
    """Metric family name → type, from the `# TYPE` lines of a scrape."""
    families = {}
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            families[name] = kind.strip()
    return families


def is_exported(name: str, families: dict[str, str]) -> bool:
    if name in families:
        return True
    for suffix in _HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and families.get(base) in ("histogram", "summary"):
            return True
    return False


# -- helper processes -------------------------------------------------------------------------
@contextmanager
def socks_proxy(log_dir: Path) -> Iterator[str]:
    """A real SOCKS5 proxy (microsocks) on loopback; yields its URL for `upstream.proxy`."""
    port = free_port()
    argv = [require_binary("microsocks"), "-i", "127.0.0.1", "-p", str(port)]
    with running(argv, ready=("127.0.0.1", port), log_path=log_dir / "microsocks.log"):
        yield f"socks5://127.0.0.1:{port}"


class Prometheus:
    """A real Prometheus server scraping the relay every second, with the alert rules loaded."""

    def __init__(self, workdir: Path, target: tuple[str, int]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "relay",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [f"{target[0]}:{target[1]}"]}],
                }
            ],
        }

    @contextmanager
    def run(self) -> Iterator[Prometheus]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config))
        argv = [
            require_binary("prometheus"),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with running(argv, ready=("127.0.0.1", self.port), log_path=self.workdir / "prometheus.log", ready_timeout=20):
            self.wait(lambda: self._status("/-/ready") == 200, "Prometheus ready")
            yield self

    def _status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/<path>; returns the whole answer (status, data or errorType/error)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
            return json.loads(exc.read())

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def vector(self, expr: str) -> list[dict]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.vector(expr)
        return float(result[0]["value"][1]) if result else None

    @staticmethod
    def wait(predicate, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)


def proxied_relay_config(workdir: Path, pki, dkim_keys, upstream_port: int, password_hash: str, proxy_url: str) -> dict:
    """The production-shaped test config, sending through the egress proxy; user "app" may
    also send as unsigned.example, a domain the relay has no DKIM key for."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = relay_config(workdir, pki, dkim_keys, upstream_port, password_hash)
    config["upstream"]["proxy"] = proxy_url
    config["clients"]["users"][0]["senders"] = ["example.com", "unsigned.example"]
    config["limits"] = {"users": {"rate": "100/s", "daily": 1000}, "domains": {"example.com": {"daily": 5000}}}
    return config


def send_mixed_traffic(relay: RelayProcess, pki) -> None:
    """Relayed mail on both listeners, and every kind of client-side refusal."""
    assert submit(relay, pki, listener="submission") == {}
    assert submit(relay, pki, listener="submissions") == {}
    with pytest.raises(smtplib.SMTPAuthenticationError):
        submit(relay, pki, password="not-" + APP_PASSWORD)
    with pytest.raises(smtplib.SMTPDataError) as no_key:
        submit(relay, pki, mail_from="app@unsigned.example")
    assert no_key.value.smtp_code == 550
    with pytest.raises(smtplib.SMTPSenderRefused):
        submit(
            relay, pki, mail_from="app@elsewhere.example", data=message(frm="app@elsewhere.example", subject="denied")
        )


# -- (a) promtool on the rule file ---------------------------------------------------------------
def test_alert_rules_pass_promtool_check_and_unit_tests():
    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_alert_rules_are_complete():
    rules = load_alerts()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    tested = yaml.safe_load(ALERT_TESTS.read_text())
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        assert rule.get("for"), f"{name} fires on a single evaluation"
        cases = [case for test in tested["tests"] for case in test["alert_rule_test"] if case["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases), f"no unit test where {name} fires"
        assert any(not c["exp_alerts"] for c in cases), f"no unit test where {name} stays quiet"


# -- (b) the dashboard ------------------------------------------------------------------------------
def test_dashboard_is_importable_with_its_variables():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "upstream", "domain"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "upstream", "domain"):
        assert variables[name]["type"] == "query"
        assert "label_values(" in variables[name]["query"], name
        assert variables[name]["datasource"]["uid"] == "${datasource}", name
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert "gridPos" in panel, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert "datasource" not in target["expr"], panel["title"]
            fill_variables(target["expr"])  # only known variables
    titles = {p["title"] for p in panels}
    assert CORE_PANELS <= titles


# -- (c) a real Prometheus scraping the real relay ------------------------------------------------------
def test_dashboard_and_alert_queries_evaluate_in_prometheus(tmp_path, pki, dkim_keys, app_password_hash, make_relay):
    # Our own upstream, not the `upstream` fixture: this test stops it, and aiosmtpd refuses
    # a second stop (the fixture's teardown).
    up = Upstream(tls="starttls", server_context=pki.server_context()).start()
    upstream_running = True
    try:
        with socks_proxy(tmp_path) as proxy_url:
            config = proxied_relay_config(tmp_path / "data", pki, dkim_keys, up.port, app_password_hash, proxy_url)
            metrics_addr = split_bind(config["metrics"]["bind"])
            # Prometheus first: it applies new scrape targets only every 5s, so it gets ready
            # while the relay starts.
            with Prometheus(tmp_path / "prometheus", metrics_addr).run() as prom:
                relay = make_relay(up.port, config=config)
                prom.wait(lambda: prom.value('up{job="relay"}') == 1, "a first scrape of the relay")
                send_mixed_traffic(relay, pki)
                # The upstream refuses DATA: the client gets its 451.
                up.behaviour.data_reply = "451 4.3.0 Try again later"
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    submit(relay, pki)
                assert refused.value.smtp_code == 451
                # The upstream goes away: the proxy cannot reach it, the client gets 451 at RCPT.
                up.stop()
                upstream_running = False
                with pytest.raises(smtplib.SMTPRecipientsRefused):
                    submit(relay, pki)

                # Wait for two scrapes after the last message (a rate needs two samples).
                done = time.time()
                prom.wait(
                    lambda: (prom.value("timestamp(relay_build_info)") or 0) > done + 2.2,
                    "two scrapes after the traffic",
                )
                assert prom.value("sum(relay_messages_rejected_total)") == relay.metric("relay_messages_rejected_total")

                failures = []
                results = {}
                for where, expr in dashboard_queries(load_dashboard()) + alert_queries():
                    answer = prom.query(expr)
                    if answer["status"] != "success":
                        failures.append(f"{where}: {answer.get('error')}\n    {expr}")
                    else:
                        panel = where.rsplit(" ", 1)[0] if where.startswith("panel ") else where
                        results.setdefault(panel, []).extend(answer["data"]["result"])
                assert not failures, "queries Prometheus refused:\n" + "\n".join(failures)
                empty = [t for t in CORE_PANELS if not results.get(f"panel {t!r}")]
                assert not empty, f"core panels without data: {empty}"
                for variable in ("instance", "upstream", "domain"):
                    assert results.get(f"variable ${variable}"), f"${variable} has no values"

                # The data itself tells what happened.
                reasons = {
                    r["metric"]["reason"] for r in prom.vector("sum by (reason) (relay_messages_rejected_total)")
                }
                assert {"no_key", "sender_denied", "upstream_temporary"} <= reasons, reasons
                assert prom.value('sum(relay_auth_attempts_total{result="failure"})') >= 1
                assert prom.value('sum(relay_upstream_replies_total{stage="data", class="4xx"})') == 1
                assert prom.value('sum(relay_upstream_connections_total{result!="ok"})') >= 1
                assert prom.value("sum(relay_proxy_failures_total)") >= 1
                assert prom.value("sum(relay_messages_relayed_total)") == 2
                assert prom.value("min(relay_ready)") == 1

                # Prometheus itself evaluates the rule file without errors.
                def rules() -> list[dict]:
                    groups = prom.api("rules")["data"]["groups"]
                    return [rule for group in groups for rule in group["rules"]]

                prom.wait(lambda: all(r["health"] != "unknown" for r in rules()), "rule evaluation")
                assert {r["name"] for r in rules()} == EXPECTED_ALERTS
                bad = {r["name"]: r.get("lastError") for r in rules() if r["health"] != "ok"}
                assert not bad, bad
    finally:
        if upstream_running:
            up.stop()


# -- (d) the names the dashboard and rules use are the names the relay exports --------------------------
@pytest.fixture(scope="module")
def relay_scrape(tmp_path_factory, pki, dkim_keys, app_password_hash) -> str:
    """The text of one scrape of a relay that relayed and refused mail through a proxy (the
    proxy metrics exist only when a proxy is configured)."""
    workdir = tmp_path_factory.mktemp("scraped-relay")
    with Upstream(tls="starttls", server_context=pki.server_context()) as up, socks_proxy(workdir) as proxy:
        config = proxied_relay_config(workdir, pki, dkim_keys, up.port, app_password_hash, proxy)
        relay = RelayProcess(workdir, config)
        try:
            relay.start()
            send_mixed_traffic(relay, pki)
            return relay.scrape()
        finally:
            relay.__exit__(None, None, None)


def test_every_metric_used_by_dashboard_and_rules_is_exported(relay_scrape):
    families = exported_families(relay_scrape)
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries(load_dashboard()) + alert_queries():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    assert used, "no relay_ metric found in the dashboard or the rules"
    missing = {name: sorted(wheres) for name, wheres in sorted(used.items()) if not is_exported(name, families)}
    assert not missing, "used but not in the relay's scrape:\n" + "\n".join(
        f"  {name}: {', '.join(wheres)}" for name, wheres in missing.items()
    )
    for rule in load_alerts():
        for name in re.findall(r"\b([a-z_]+)\{", rule["expr"]):
            assert name.startswith("relay_") or name in PROMETHEUS_MADE, (rule["alert"], name)


def test_scrape_passes_promtool_check_metrics(relay_scrape):
    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=relay_scrape, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


def test_kubernetes_prometheusrule_carries_exactly_the_alert_rules():
    import yaml

    repo = Path(__file__).parent.parent
    rules = yaml.safe_load((repo / "deploy" / "grafana" / "relay-alerts.yaml").read_text())
    operator = yaml.safe_load((repo / "deploy" / "kubernetes" / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == rules["groups"]


@in_thread
def test_a_reload_that_renames_the_listener_and_the_upstream_counts_under_the_new_names(make_loop_relay, upstream, pki):
    """The per-message metrics keep their label children once looked up; new names after a
    reload are new children, and the old names count nothing more."""
    relay = make_loop_relay(upstream.port)
    assert submit(relay, pki) == {}
    settings = relay.running.settings
    listeners = [
        lst.model_copy(update={"name": "apps"}) if lst.name == "submission" else lst for lst in settings.listeners
    ]
    renamed = settings.model_copy(
        update={"listeners": listeners, "upstream": [settings.upstream[0].model_copy(update={"name": "smarthost-b"})]}
    )
    relay.running._reload_settings = lambda: renamed
    assert relay._in_loop(relay.running.reload(), 20)
    assert submit(relay, pki, listener="apps") == {}
    upstream.wait_for(2)
    for listener, upstream_label in (("submission", settings.upstream[0].label), ("apps", "smarthost-b")):
        assert relay.metric("relay_messages_relayed_total", listener=listener, upstream=upstream_label) == 1
        assert relay.metric("relay_messages_received_total", listener=listener) == 1
        assert relay.metric("relay_message_size_bytes_count", listener=listener) == 1
        assert relay.metric("relay_message_relay_duration_seconds_count", listener=listener) == 1
        assert relay.metric("relay_sessions_total", listener=listener) == 1
        assert relay.metric("relay_auth_attempts_total", listener=listener, result="success") == 1
        assert relay.metric("relay_upstream_replies_total", upstream=upstream_label, stage="data") == 1
        assert relay.metric("relay_upstream_latency_seconds_count", upstream=upstream_label) == 1
    assert relay.metric("relay_dkim_signatures_total", domain="example.com", selector="s1") == 2
