"""The metric names and label names, read from the code, agree with docs/metrics.md, with the
names PRODUCT.md promises, and with every selector, grouping and legend of the Grafana
dashboard and the alert rules. (tests/test_observability.py checks the names against a real
scrape; a label name that no series has would still evaluate there, to nothing.)"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[2]
METRICS_DOC = REPO / "docs" / "metrics.md"
PRODUCT = REPO.parent / "shared" / "PRODUCT.md"
DASHBOARD = REPO / "deploy" / "grafana" / "relay-dashboard.json"
ALERTS = REPO / "deploy" / "grafana" / "relay-alerts.yaml"

# Labels Prometheus adds to every series (the target's), and the histogram's bucket label.
TARGET_LABELS = {"instance", "job"}
_KINDS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "GaugeMetricFamily": "gauge",
    "CounterMetricFamily": "counter",
}
_SELECTOR = re.compile(r"\b(relay_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*\$?(?:labels\.)?(\w+)\s*\}\}")
_NAME = re.compile(r"\b(relay_[a-z0-9_]+)\b")


def code_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name → (type, label names), from every metric constructed in relay/."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for path in (REPO / "relay").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            kind = _KINDS.get(getattr(node.func, "id", None) or getattr(node.func, "attr", ""))
            if kind is None or not node.args or not isinstance(node.args[0], ast.Constant):
                continue
            labels: ast.expr | None = node.args[2] if len(node.args) > 2 else None
            for keyword in node.keywords:
                if keyword.arg in ("labelnames", "labels"):
                    labels = keyword.value
            names = tuple(ast.literal_eval(labels)) if labels is not None else ()
            found[node.args[0].value] = (kind, names)
    return found


def documented_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name → (type, label names), from the table in docs/metrics.md."""
    found = {}
    for line in METRICS_DOC.read_text().splitlines():
        if not line.startswith("| `relay_"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        found[cells[0].strip("`")] = (cells[1], tuple(re.findall(r"`(\w+)`", cells[2])))
    return found


def used_expressions() -> list[tuple[str, str, list[str]]]:
    """(where, PromQL, legends/annotations that name labels) of the dashboard and the rules."""
    out = []

    def panels(items: list[dict]):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            legend = target.get("legendFormat") or ""
            out.append((f"panel {panel['title']!r}", target["expr"], [legend]))
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            texts = [str(v) for v in rule.get("annotations", {}).values()]
            out.append((f"alert {rule['alert']}", rule["expr"], texts))
    return out


def _family(name: str, metrics: dict[str, tuple[str, tuple[str, ...]]]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and metrics.get(base, ("",))[0] == "histogram":
            return base
    return name


def test_docs_list_every_metric_with_its_type_and_labels():
    code, docs = code_metrics(), documented_metrics()
    assert code, "no metric found in relay/"
    assert sorted(set(code) - set(docs)) == [], "exported but not in docs/metrics.md"
    assert sorted(set(docs) - set(code)) == [], "in docs/metrics.md but not exported"
    wrong = {name: (docs[name], code[name]) for name in code if docs[name] != code[name]}
    assert not wrong, "docs/metrics.md (type, labels) vs the code:\n" + "\n".join(
        f"  {name}: documented {d}, exported {c}" for name, (d, c) in wrong.items()
    )


@pytest.mark.skipif(not PRODUCT.is_file(), reason="PRODUCT.md lives beside the repository")
def test_every_metric_product_md_names_is_exported_with_those_labels():
    code = code_metrics()
    promised = re.findall(r"`(relay_[a-z0-9_]+)(?:\{([a-z_, ]*)\})?`", PRODUCT.read_text())
    assert promised
    for name, labels in promised:
        assert name in code, f"PRODUCT.md names {name}"
        if labels:
            wanted = tuple(label.strip() for label in labels.split(","))
            assert code[name][1] == wanted, f"{name}: PRODUCT.md says {wanted}, the code has {code[name][1]}"


def test_dashboard_and_rules_use_only_label_names_the_metrics_have():
    code = code_metrics()
    problems = []
    for where, expr, texts in used_expressions():
        names = {_family(name, code) for name in _NAME.findall(expr)}
        known = set(TARGET_LABELS)
        for name in names:
            known |= set(code.get(name, ("", ()))[1])
            if code.get(name, ("",))[0] == "histogram":
                known.add("le")
        for name, matchers in _SELECTOR.findall(expr):
            family = _family(name, code)
            own = set(code.get(family, ("", ()))[1]) | TARGET_LABELS | ({"le"} if family != name else set())
            problems += [f"{where}: {name} has no label {label!r}" for label in set(_MATCHER.findall(matchers)) - own]
        for grouping in _GROUPING.findall(expr):
            labels = {label.strip() for label in grouping.split(",") if label.strip()}
            problems += [f"{where}: no metric in the expression has label {label!r}" for label in labels - known]
        for text in texts:
            legends = set(_LEGEND.findall(text)) - {"value"}
            problems += [f"{where}: legend/annotation names label {label!r}" for label in legends - known]
    assert not problems, "\n".join(problems)


def test_grafana_readme_names_every_alert_rule():
    readme = (REPO / "deploy" / "grafana" / "README.md").read_text()
    names = [rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert names
    assert [name for name in names if f"`{name}`" not in readme] == []
