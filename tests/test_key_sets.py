"""A running relay follows its key set (the fast tier: the relay in the test's loop).

The document is written here as `relay dkim rotate` writes it at each step (the rotation
itself is tested in tests/unit/test_rotate.py and, with DNS and AWS, test_rotate_e2e.py);
what this shows is the relay's side: keys fetched ahead while pending, the signing set
changed and logged when a state changes, mail signed and verifying throughout.
"""

from __future__ import annotations

import json
import os

from relay.sign.keys import generate_private_key, load_signing_key, private_key_pem
from tests.support.dkim import verify_all
from tests.support.inloop import in_thread
from tests.support.smtp import connect, message


def write_key(path) -> bytes:
    pem = private_key_pem(generate_private_key("rsa-sha256"))
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    return (
        b"v=DKIM1; k=rsa; p="
        + load_signing_key(pem, domain="example.com", selector="x", algorithm="rsa-sha256").public_b64.encode()
    )


def write_doc(path, keydir, *keys, step=None) -> None:
    entries = [
        {"selector": s, "key": f"file://{keydir}/{s}.key", "state": state, "created": "2026-11-01T00:00:00Z"}
        for s, state in keys
    ]
    rotation = None
    if step:
        rotation = {
            "new": "k2",
            "old": ["k1"],
            "step": step,
            "publish": "print",
            "overlap": 1,
            "grace": 1,
            "started": "2026-11-16T00:00:00Z",
        }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": 1, "domain": "example.com", "keys": entries, "rotation": rotation}))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # as the file backend writes it


@in_thread
def test_the_relay_signs_with_what_its_key_set_says(make_loop_relay, upstream, pki, tmp_path):
    keydir = tmp_path / "keys"
    keydir.mkdir()
    dns = {b"k1._domainkey.example.com.": write_key(keydir / "k1.key")}
    doc = keydir / "key-set.json"
    write_doc(doc, keydir, ("k1", "active"))
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["dkim"] = {
        "key_sets": [{"domain": "example.com", "key_set": f"file://{doc}", "key": f"file://{keydir}/{{selector}}.key"}]
    }
    relay.config["secrets"] = {"refresh": "1s"}
    relay.start()
    relay.wait_log(lambda e: str(e.get("msg")).startswith("DKIM signing set") and e.get("selectors") == ["k1"])
    sent = 0

    def send() -> list[bool]:
        nonlocal sent
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message(subject=f"m{sent}"))
        sent += 1
        signed = upstream.wait_for(sent)[sent - 1].content
        return verify_all(signed, lambda name, timeout=5: dns.get(name))

    assert send() == [True]

    # Pending: fetched ahead, not signing.
    dns[b"k2._domainkey.example.com."] = write_key(keydir / "k2.key")
    write_doc(doc, keydir, ("k1", "active"), ("k2", "pending"), step="confirm")
    assert send() == [True]

    write_doc(doc, keydir, ("k1", "active"), ("k2", "active"), step="overlap")
    relay.wait_log(lambda e: e.get("msg") == "DKIM signing set changed" and e.get("selectors") == ["k1", "k2"])
    assert send() == [True, True]

    write_doc(doc, keydir, ("k1", "retired"), ("k2", "active"), step="grace")
    relay.wait_log(lambda e: e.get("msg") == "DKIM signing set changed" and e.get("selectors") == ["k2"])
    assert send() == [True]
    del dns[b"k1._domainkey.example.com."]  # the old record goes after the grace period
    write_doc(doc, keydir, ("k2", "active"))
    assert send() == [True]
    assert relay.metric("relay_dkim_key_max_age_seconds", domain="example.com") == 180 * 86400
