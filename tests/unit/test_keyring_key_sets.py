"""The key ring with a key set: it holds what the document lists, signs with the active
keys, logs every change of the signing set, and never lets a document empty it."""

from __future__ import annotations

import json
import logging
import os

import pytest

from relay.config.schema import DkimSettings
from relay.secrets.local import FileBackend
from relay.secrets.store import SecretStore
from relay.sign.keyring import KeyRing
from relay.sign.keys import generate_private_key, private_key_pem


def write_key(path) -> None:
    path.write_bytes(private_key_pem(generate_private_key("rsa-sha256")))
    os.chmod(path, 0o600)


def write_doc(path, tmp_path, *keys, step=None) -> None:
    entries = [
        {"selector": s, "key": f"file://{tmp_path}/{s}.key", "state": state, "created": "2026-11-01T00:00:00Z"}
        for s, state in keys
    ]
    rotation = None
    if step:
        rotation = {
            "new": keys[-1][0],
            "old": [keys[0][0]],
            "step": step,
            "publish": "print",
            "overlap": 1,
            "grace": 1,
            "started": "2026-11-16T00:00:00Z",
        }
    path.write_text(json.dumps({"version": 1, "domain": "example.com", "keys": entries, "rotation": rotation}))
    os.utime(path, ns=(os.stat(path).st_mtime_ns + 1_000_000, os.stat(path).st_mtime_ns + 1_000_000))


def changes(caplog) -> list[tuple[list, list]]:
    return [(r.previous, r.selectors) for r in caplog.records if r.msg == "DKIM signing set changed"]


async def test_the_signing_set_follows_the_document(tmp_path, caplog):
    write_key(tmp_path / "s1.key")
    doc = tmp_path / "key-set.json"
    settings = DkimSettings.model_validate(
        {
            "keys": [{"domain": "example.com", "selector": "s1", "key": f"file://{tmp_path}/s1.key"}],
            "key_sets": [
                {"domain": "example.com", "key_set": f"file://{doc}", "key": f"file://{tmp_path}/{{selector}}.key"}
            ],
        }
    )
    store = SecretStore([FileBackend()], 1)
    await store.ensure([f"file://{tmp_path}/s1.key", f"file://{doc}"])  # no document yet: s1 (static) signs
    ring = KeyRing(settings, store)
    ring.attach()
    await ring.fetch_missing()
    assert [k.selector for k in ring.keys_for("example.com")] == ["s1"]
    assert ring.never_loaded() == {}

    caplog.set_level(logging.INFO, logger="relay.dkim")
    # The document appears with s2 pending: s2 is fetched ahead, but does not sign.
    write_key(tmp_path / "s2.key")
    write_doc(doc, tmp_path, ("s1", "active"), ("s2", "pending"), step="confirm")
    await store.refresh()
    await ring.fetch_missing()
    assert [k.selector for k in ring.keys_for("example.com")] == ["s1"]
    assert store.get(f"file://{tmp_path}/s2.key") is not None
    assert ring.owns("example.com", "s2")

    write_doc(doc, tmp_path, ("s1", "active"), ("s2", "active"), step="overlap")
    await store.refresh()
    assert [k.selector for k in ring.keys_for("example.com")] == ["s1", "s2"]

    # A document whose only active key cannot be loaded does not empty the set.
    write_doc(doc, tmp_path, ("s1", "retired"), ("s2", "retired"), ("s3", "active"), step="grace")
    await store.refresh()
    await ring.fetch_missing()
    assert [k.selector for k in ring.keys_for("example.com")] == ["s1", "s2"]
    assert any(r.msg.startswith("DKIM signing set would be empty") for r in caplog.records)
    assert ring.never_loaded() == {"example.com/s3": f"file://{tmp_path}/s3.key: cannot read (no such file)"}

    write_key(tmp_path / "s3.key")
    await store.refresh()
    assert [k.selector for k in ring.keys_for("example.com")] == ["s3"]
    assert changes(caplog) == [(["s1"], ["s1", "s2"]), (["s1", "s2"], ["s3"])]

    # Keys the document dropped (and the superseded static one) are no longer fetched.
    write_doc(doc, tmp_path, ("s3", "active"))
    await store.refresh()
    assert store.get(f"file://{tmp_path}/s1.key") is None and store.get(f"file://{tmp_path}/s2.key") is None
    assert not ring.owns("example.com", "s2") and ring.owns("example.com", "s1")  # s1: still in dkim.keys
    ring.detach()


def test_a_key_set_document_nested_thousands_deep_or_with_a_huge_version_is_refused_briefly():
    from relay.sign.keyset import KeySet, KeySetError

    with pytest.raises(KeySetError, match="^not JSON$"):
        KeySet.from_bytes(b"[" * 100_000 + b"]" * 100_000, "example.com")
    with pytest.raises(KeySetError) as err:
        KeySet.from_bytes(b'{"version": "' + b"v" * 100_000 + b'"}', "example.com")
    assert len(str(err.value)) < 100
