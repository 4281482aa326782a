"""`relay dkim status`: each domain's selectors, their ages and states, and the next step.

`domain_status` is pure (the caller reads the documents), so the same view serves the
command's table and its JSON (`to_json`, version 1; key by key in docs/json.md):

    {"version": 1, "domains": [{
        "domain", "source": "key_set" | "static" | "seed" (key set configured, no document yet),
        "key_set": ref | null,
        "keys": [{"selector", "state", "algorithm", "key", "age_seconds" | null, "since" | null}],
        "rotation": null | {"new", "old": [...], "step", "started"},
        "next": [{"when" (ISO time | null), "when_text", "action"}],
        "problem": str | null, "notes": [str]}]}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from relay.config.schema import DkimKeySetSettings, DkimKeySettings, DkimRotationSettings
from relay.rotate.rotation import PlannedStep, remaining_steps
from relay.sign.keyset import KeySet

VERSION = 1


@dataclass(frozen=True)
class KeyRow:
    selector: str
    state: str
    algorithm: str
    key: str
    age_seconds: float | None  # None: unknown (a static key)
    since: datetime | None = None  # when it entered its state


@dataclass(frozen=True)
class DomainStatus:
    domain: str
    source: str
    key_set: str | None
    keys: tuple[KeyRow, ...]
    rotation: dict[str, Any] | None = None
    next: tuple[PlannedStep, ...] = ()
    problem: str | None = None
    notes: tuple[str, ...] = field(default=())


def domain_status(
    domain: str,
    *,
    config: DkimKeySetSettings | None,
    settings: DkimRotationSettings,
    keyset: KeySet | None,
    static_keys: Sequence[DkimKeySettings],
    now: datetime,
    problem: str | None = None,
    resolver: str = "the configured resolver",
) -> DomainStatus:
    static = tuple(KeyRow(k.selector, "static", k.algorithm, k.key, None) for k in static_keys if k.domain == domain)
    if config is None:
        return DomainStatus(domain, "static", None, static)
    if keyset is None:
        steps = (
            () if problem else tuple(remaining_steps(KeySet(domain=domain), config, settings, now, resolver=resolver))
        )
        return DomainStatus(domain, "seed", config.key_set, static, next=steps, problem=problem)
    rows = []
    for entry in keyset.keys:
        since = {"active": entry.active_since, "retired": entry.retired_since}.get(entry.state, entry.created)
        rows.append(
            KeyRow(
                entry.selector, entry.state, entry.algorithm, entry.key, (now - entry.created).total_seconds(), since
            )
        )
    rotation = None
    if keyset.rotation is not None:
        r = keyset.rotation
        rotation = {"new": r.new, "old": list(r.old), "step": r.step, "started": r.started.isoformat()}
    steps = tuple(remaining_steps(keyset, config, settings, now, resolver=resolver)) if rotation else ()
    notes = []
    oldest = max((r.age_seconds for r in rows if r.state == "active" and r.age_seconds is not None), default=None)
    if rotation is None and oldest is not None and oldest > settings.max_key_age:
        notes.append(f"the signing key is older than dkim.rotation.max_key_age: run relay dkim rotate -d {domain}")
    return DomainStatus(domain, "key_set", config.key_set, tuple(rows), rotation, steps, problem, tuple(notes))


def render(statuses: Sequence[DomainStatus]) -> str:
    lines = []
    for status in statuses:
        source = {
            "static": "dkim.keys",
            "seed": f"key set {status.key_set} (not written yet: dkim.keys signs)",
            "key_set": f"key set {status.key_set}",
        }[status.source]
        lines.append(f"{status.domain}  ({source})")
        for row in status.keys:
            age = _age(row.age_seconds) if row.age_seconds is not None else "age unknown"
            lines.append(f"  {row.selector:<20} {row.state:<8} {row.algorithm:<15} {age:>10}   {row.key}")
        if status.problem:
            lines.append(f"  problem: {status.problem}")
        if status.rotation:
            r = status.rotation
            lines.append(f"  rotating {', '.join(r['old']) or '(none)'} → {r['new']}: next step {r['step']}")
        for step in status.next:
            lines.append(f"  next: {step.when_text}: {step.action}")
        lines += [f"  note: {note}" for note in status.notes]
    return "\n".join(lines)


def to_json(statuses: Sequence[DomainStatus]) -> dict[str, Any]:
    return {
        "version": VERSION,
        "domains": [
            {
                "domain": s.domain,
                "source": s.source,
                "key_set": s.key_set,
                "keys": [
                    {
                        "selector": r.selector,
                        "state": r.state,
                        "algorithm": r.algorithm,
                        "key": r.key,
                        "age_seconds": None if r.age_seconds is None else round(r.age_seconds),
                        "since": r.since.isoformat() if r.since else None,
                    }
                    for r in s.keys
                ],
                "rotation": s.rotation,
                "next": [
                    {"when": p.when.isoformat() if p.when else None, "when_text": p.when_text, "action": p.action}
                    for p in s.next
                ],
                "problem": s.problem,
                "notes": list(s.notes),
            }
            for s in statuses
        ],
    }


def _age(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.0f}d" if days >= 1 else f"{seconds / 3600:.0f}h"
