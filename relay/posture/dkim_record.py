"""Is each DKIM key published, and is it the public half of the key the relay signs with?

For one configured key, fetch `SELECTOR._domainkey.DOMAIN` TXT (RFC 6376 §3.6.2.1; the
resolver joins the character-strings of a record, §3.6.2.2), parse its tags (§3.6.1) and
compare `p=` with the relay's key. Outcomes (`DkimRecordCheck.status`):

    match        the published key is the relay's key
    mismatch     another key is published, or k= names another key type than the algorithm
    missing      no TXT record at the name
    revoked      p= is empty (§3.6.1: the key was revoked)
    invalid      not a usable key record (tag syntax, v=, unknown k=, bad p=, h= without
                 sha256, s= without email)
    multiple     several TXT records: verifiers pick one of them (§3.6.2.2), so signatures
                 would verify by chance
    temperror    the DNS lookup failed (timeout, SERVFAIL): nothing is known
    unavailable  the relay's private key is not loaded, so there is nothing to compare (this
                 wins over every status but temperror)

A match in test mode (t=y) or with an RSA key under 2048 bits is a warning.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.util import DuplicateTag, InvalidTagValueList, parse_tag_value

from relay.dns.resolver import DnsNameError, DnsService, DnsTemporaryError
from relay.posture.levels import FAIL, OK, WARN
from relay.sign.keys import MIN_RSA_BITS, WEAK_RSA_BITS, SigningKey
from relay.spf.record import cut

_KEY_TYPES = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}


@dataclass(frozen=True)
class DkimRecordCheck:
    domain: str
    selector: str
    algorithm: str  # the configured algorithm: rsa-sha256 | ed25519-sha256
    status: str  # see the module docstring
    record: str | None = None  # the published TXT value (strings joined)
    dns_key_type: str | None = None  # k= of the record ("rsa" when absent)
    dns_key_bits: int | None = None  # size of the published key
    local_key_bits: int | None = None
    test_mode: bool = False  # t=y
    problem: str | None = None
    warnings: tuple[str, ...] = ()
    expected: str | None = None  # the TXT value to publish for the relay's key

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def level(self) -> str:
        if self.status != "match":
            return FAIL
        return WARN if self.warnings else OK

    @property
    def summary(self) -> str:
        label = f"{self.selector} ({self.algorithm})"
        size = f", {self.dns_key_bits} bits" if self.dns_key_type == "rsa" and self.dns_key_bits else ""
        if self.status == "match":
            text = f"{label}: published key matches{size}"
            return text + (f"; {'; '.join(self.warnings)}" if self.warnings else "")
        return f"{label}: {self.problem}"

    @property
    def remediation(self) -> str | None:
        publish = f'{self.name} TXT "{self.expected}"' if self.expected else None
        if self.status == "match":
            if self.test_mode:
                return f"once signatures verify, drop t=y: {publish}"
            if self.warnings:
                return (
                    f"rotate to a {MIN_RSA_BITS}-bit key: relay keygen -d {self.domain} "
                    f"-s <new selector> --bits {MIN_RSA_BITS}"
                )
            return None
        if self.status == "temperror":
            return "the DNS lookup failed: check dns.nameservers and run the check again"
        if self.status == "unavailable":
            return f"make the private key for {self.domain}/{self.selector} loadable (dkim.keys[].key)"
        if self.status == "revoked":
            return f"the key is revoked in DNS: remove this selector from dkim.keys, or publish {publish}"
        if self.status == "multiple":
            return f"keep exactly one record: {publish}"
        return f"publish {publish}"


async def check_dkim_record(
    dns: DnsService,
    *,
    domain: str,
    selector: str,
    algorithm: str,
    key: SigningKey | None,
    key_problem: str | None = None,
) -> DkimRecordCheck:
    """Check one configured key against DNS. `key` is None when it is not loaded; then
    `key_problem` says why, the status is "unavailable" (or "temperror") and the record is
    only described."""
    base = DkimRecordCheck(
        domain=domain,
        selector=selector,
        algorithm=algorithm,
        status="",
        local_key_bits=key.bits if key else None,
        expected=key.txt_value() if key else None,
    )
    name = f"{selector}._domainkey.{domain}"
    try:
        answer = await dns.resolve(name, "TXT")
    except DnsTemporaryError as exc:
        return replace(base, status="temperror", problem=f"DNS lookup failed: {exc}")
    except DnsNameError as exc:
        return replace(base, status="invalid", problem=str(exc))
    records = [bytes(r) for r in answer.records]
    if key is None:
        # Without the private key there is nothing to compare, nor a record to suggest;
        # still describe what is published.
        described = replace(
            base, status="unavailable", problem=f"the relay's private key is not loaded ({key_problem or 'unknown'})"
        )
        if len(records) == 1:
            described = replace(described, record=records[0].decode("ascii", errors="replace"))
            parsed = _parse(records[0])
            if not isinstance(parsed, str):
                tags, key_type, _, bits = parsed
                described = replace(described, dns_key_type=key_type, dns_key_bits=bits, test_mode=_test_mode(tags))
        return described
    if not records:
        return replace(base, status="missing", problem=f"no TXT record at {name}")
    if len(records) > 1:
        return replace(base, status="multiple", problem=f"{len(records)} TXT records at {name}; verifiers use any one")
    raw = records[0]
    record = raw.decode("ascii", errors="replace")
    parsed = _parse(raw)
    if isinstance(parsed, str):
        return replace(base, status="invalid", record=record, problem=parsed)
    tags, key_type, public, bits = parsed
    common = replace(base, record=record, dns_key_type=key_type, dns_key_bits=bits, test_mode=_test_mode(tags))
    if public is None:
        return replace(common, status="revoked", problem="the key is revoked (empty p=)")
    wanted_type = _KEY_TYPES.get(algorithm, algorithm)
    if key_type != wanted_type:
        return replace(common, status="mismatch", problem=f"k={key_type} does not fit the {algorithm} key")
    if not _same_key(key, public):
        size = f"{bits}-bit " if key_type == "rsa" and bits else ""
        return replace(common, status="mismatch", problem=f"the published {size}key is not the relay's key")
    warnings = []
    if common.test_mode:
        warnings.append("test mode (t=y): verifiers may ignore failures")
    if key_type == "rsa" and bits is not None and bits < MIN_RSA_BITS:
        warnings.append(f"{bits}-bit RSA key: {MIN_RSA_BITS} bits recommended (RFC 8301 §3.2)")
    return replace(common, status="match", warnings=tuple(warnings))


def tag_list_problem(exc: InvalidTagValueList) -> str:
    """What is wrong with a tag=value list (RFC 6376 §3.2, RFC 7489 §6.4), in words: dkimpy's
    exception carries only the raw bytes (of a record that may be 64 KiB)."""
    raw = exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""
    text = cut(raw.decode("ascii", "backslashreplace"))
    if isinstance(exc, DuplicateTag):
        return f"tag {text}= given twice (RFC 6376 §3.2)"
    return f"{text!r} is not tag=value (RFC 6376 §3.2)"


def _test_mode(tags: dict[str, str]) -> bool:
    return "y" in [flag.strip().lower() for flag in tags.get("t", "").split(":")]


def _parse(raw: bytes) -> tuple[dict[str, str], str, bytes | None, int | None] | str:
    """(tags, key type, public key bytes or None if revoked, bits) or why it is invalid."""
    try:
        parsed = parse_tag_value(raw)
    except InvalidTagValueList as exc:
        return f"not a DKIM key record: {tag_list_problem(exc)}"
    tags = {k.decode("ascii", "replace").lower(): v.decode("ascii", "replace") for k, v in parsed.items()}
    if "v" in tags and (tags["v"] != "DKIM1" or next(iter(tags)) != "v"):
        return "v= must be DKIM1 and come first (RFC 6376 §3.6.1)"
    if "p" not in tags:
        return "no p= tag (RFC 6376 §3.6.1)"
    key_type = tags.get("k", "rsa").strip().lower()
    if key_type not in ("rsa", "ed25519"):
        return f"unknown key type k={cut(key_type)}"
    hashes = [h.strip().lower() for h in tags.get("h", "").split(":") if h.strip()]
    if hashes and "sha256" not in hashes:
        return f"h={cut(tags['h'])} excludes sha256, which the relay signs with"
    services = [s.strip().lower() for s in tags.get("s", "*").split(":")]
    if "*" not in services and "email" not in services:
        return f"s={cut(tags['s'])}: the key is not for email"
    p = "".join(tags["p"].split())  # §3.6.1: FWS may appear inside p=
    if not p:
        return tags, key_type, None, None
    try:
        public = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError):
        return "p= is not valid base64"
    if key_type == "ed25519":
        if len(public) != 32:
            return f"p= holds {len(public)} bytes; an Ed25519 key has 32 (RFC 8463 §4)"
        return tags, key_type, public, 256
    try:
        loaded = serialization.load_der_public_key(public)
    except (ValueError, TypeError):
        return "p= is not an RSA public key"
    if not isinstance(loaded, rsa.RSAPublicKey):
        return "p= is not an RSA public key"
    if loaded.key_size < WEAK_RSA_BITS:
        return f"{loaded.key_size}-bit RSA key: verifiers reject keys under {WEAK_RSA_BITS} bits (RFC 8301 §3.2)"
    return tags, key_type, public, loaded.key_size


def _same_key(key: SigningKey, public: bytes) -> bool:
    if key.key_type == "ed25519":
        return base64.b64decode(key.public_b64) == public
    # p= may be SubjectPublicKeyInfo (common) or a bare RSAPublicKey (RFC 6376 §3.6.1):
    # compare the numbers, not the encodings.
    published = serialization.load_der_public_key(public)
    return isinstance(published, rsa.RSAPublicKey) and (
        published.public_numbers() == key.private.public_key().public_numbers()  # type: ignore[union-attr]
    )
