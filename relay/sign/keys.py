"""DKIM private keys: detect the format, validate, and precompute the public half.

Accepted: PEM RSA (PKCS#1 `RSA PRIVATE KEY` or PKCS#8 `PRIVATE KEY`), PEM Ed25519
(PKCS#8), and the raw base64 Ed25519 seed that dkimpy and `relay keygen` write.
Keys are parsed once, when they are loaded or rotated, never per message.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

# RFC 8301 §3.2: verifiers must accept 1024..4096 bits; we sign with ≥2048 unless allowed.
MIN_RSA_BITS = 2048
WEAK_RSA_BITS = 1024


class KeyMaterialError(ValueError):
    """The key material is unusable; the message never contains key bytes."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" | "ed25519-sha256"
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)
    public_b64: str  # the p= value to publish (RFC 6376 §3.6.1, RFC 8463 §4)
    bits: int

    @property
    def key_type(self) -> str:
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    def txt_value(self) -> str:
        return f"v=DKIM1; k={self.key_type}; p={self.public_b64}"


def load_signing_key(
    data: bytes, *, domain: str, selector: str, algorithm: str, allow_weak_rsa: bool = False
) -> SigningKey:
    private = parse_private_key(data)
    if isinstance(private, rsa.RSAPrivateKey):
        if algorithm != "rsa-sha256":
            raise KeyMaterialError(f"the key is RSA but the algorithm is {algorithm}")
        bits = private.key_size
        floor = WEAK_RSA_BITS if allow_weak_rsa else MIN_RSA_BITS
        if bits < floor:
            hint = "" if allow_weak_rsa else " (dkim.allow_weak_rsa permits 1024)"
            raise KeyMaterialError(f"RSA key has {bits} bits; at least {floor} are required{hint}")
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        if algorithm != "ed25519-sha256":
            raise KeyMaterialError(f"the key is Ed25519 but the algorithm is {algorithm}")
        bits = 256
        # RFC 8463 §4: p= is the raw 32-byte public key, base64.
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(
        domain=domain,
        selector=selector,
        algorithm=algorithm,
        private=private,
        public_b64=base64.b64encode(public).decode("ascii"),
        bits=bits,
    )


def parse_private_key(data: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyMaterialError(f"PEM private key could not be parsed ({type(exc).__name__})") from None
        if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            return key
        raise KeyMaterialError(f"unsupported key type {type(key).__name__}; DKIM uses RSA or Ed25519")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyMaterialError("not a PEM key and not a base64 Ed25519 seed") from None
    # 32 bytes: the seed (dkimpy's format); 64: NaCl's seed||public.
    if len(raw) in (32, 64):
        return ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
    if raw[:1] == b"\x30":  # DER
        try:
            key = serialization.load_der_private_key(raw, password=None)
        except (ValueError, TypeError):
            raise KeyMaterialError("DER private key could not be parsed") from None
        if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            return key
    raise KeyMaterialError(f"base64 key material of {len(raw)} bytes is neither an Ed25519 seed nor DER")


def generate_private_key(algorithm: str, bits: int = 2048) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate()
    if bits not in (2048, 3072, 4096):
        raise ValueError("RSA key size must be 2048, 3072 or 4096")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_pem(private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def txt_strings(value: str, limit: int = 255) -> list[str]:
    """Split a TXT value into character-strings of at most 255 bytes (RFC 1035 §3.3.14);
    resolvers join them back (RFC 6376 §3.6.2.2)."""
    return [value[i : i + limit] for i in range(0, len(value), limit)] or [""]


def zone_line(domain: str, selector: str, value: str, ttl: int = 3600) -> str:
    """The record as a zone-file line, in strings a zone file and every DNS server accept."""
    strings = " ".join(f'"{s}"' for s in txt_strings(value))
    return f"{selector}._domainkey.{domain}. {ttl} IN TXT ( {strings} )"
