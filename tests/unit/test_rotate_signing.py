"""The relay's view of key sets: seed, document, states, a bad document."""

from __future__ import annotations

import json
import logging

from relay.config.schema import DkimSettings
from relay.secrets.base import SecretValue
from relay.sign.key_sets import SigningSets

DOC = "file:///run/relay/key-set.json"
SETTINGS = DkimSettings.model_validate(
    {
        "keys": [
            {"domain": "example.com", "selector": "s1", "key": "file:///k/s1"},
            {"domain": "example.org", "selector": "o1", "key": "file:///k/o1"},
        ],
        "key_sets": [{"domain": "example.com", "key_set": DOC, "key": "file:///k/{selector}"}],
    }
)


def doc(*keys, rotation=None) -> SecretValue:
    entries = [
        {"selector": s, "key": f"file:///k/{s}", "state": state, "created": "2026-11-01T00:00:00Z"} for s, state in keys
    ]
    data = {"version": 1, "domain": "example.com", "keys": entries, "rotation": rotation}
    return SecretValue(json.dumps(data).encode(), version=str(len(keys)))


def rotation(new, old, step="confirm"):
    return {
        "new": new,
        "old": old,
        "step": step,
        "publish": "print",
        "overlap": 1,
        "grace": 1,
        "started": "2026-11-16T00:00:00Z",
    }


def test_static_keys_sign_until_the_document_is_read():
    sets = SigningSets(SETTINGS)
    assert sets.documents == [DOC]
    assert [(k.domain, k.selector) for k in sets.entries()] == [("example.com", "s1"), ("example.org", "o1")]
    assert sets.signs("example.com", "s1")

    assert sets.on_document(DOC, doc(("s1", "active"), ("s2", "pending"), rotation=rotation("s2", ["s1"])))
    # the pending key is held (loaded ahead) but does not sign
    assert [(k.domain, k.selector) for k in sets.entries()] == [
        ("example.org", "o1"),
        ("example.com", "s1"),
        ("example.com", "s2"),
    ]
    assert sets.signs("example.com", "s1") and not sets.signs("example.com", "s2")

    assert not sets.on_document(DOC, doc(("s1", "active"), ("s2", "pending"), rotation=rotation("s2", ["s1"])))
    assert sets.on_document(DOC, doc(("s1", "retired"), ("s2", "active"), rotation=rotation("s2", ["s1"], "grace")))
    assert not sets.signs("example.com", "s1") and sets.signs("example.com", "s2")
    assert sets.on_document(DOC, doc(("s2", "active")))
    assert [k.selector for k in sets.entries()] == ["o1", "s2"]  # the static s1 never comes back


def test_a_bad_document_keeps_the_last_good_one(caplog):
    sets = SigningSets(SETTINGS)
    sets.on_document(DOC, doc(("s2", "active")))
    with caplog.at_level(logging.ERROR, logger="relay.dkim"):
        assert not sets.on_document(DOC, SecretValue(b"{not json", version="x"))
    assert sets.signs("example.com", "s2")
    assert caplog.records[0].reason == "not JSON"
    assert not sets.on_document("file:///other", doc(("s3", "active")))
