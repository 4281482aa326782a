"""DKIM key material: every accepted format is detected and validated at load."""

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.sign.keys import KeyMaterialError, load_signing_key

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
ED = ed25519.Ed25519PrivateKey.generate()


def pem(key, fmt) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def load(data: bytes, algorithm="rsa-sha256", **kw):
    return load_signing_key(data, domain="example.com", selector="s1", algorithm=algorithm, **kw)


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8], ids=["pkcs1", "pkcs8"]
)
def test_rsa_pem(fmt):
    key = load(pem(RSA, fmt))
    assert key.bits == 2048 and key.key_type == "rsa"
    der = RSA.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_b64 == base64.b64encode(der).decode()


def test_ed25519_pem_and_raw_seed_give_the_same_public_key():
    raw_seed = ED.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    from_pem = load(pem(ED, serialization.PrivateFormat.PKCS8), "ed25519-sha256")
    from_seed = load(base64.b64encode(raw_seed), "ed25519-sha256")  # dkimpy's key file format
    raw_public = ED.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert from_pem.public_b64 == from_seed.public_b64 == base64.b64encode(raw_public).decode()


def test_short_rsa_key_is_refused_unless_allowed():
    with pytest.raises(KeyMaterialError, match="1024 bits; at least 2048"):
        load(pem(RSA_1024, serialization.PrivateFormat.PKCS8))
    assert load(pem(RSA_1024, serialization.PrivateFormat.PKCS8), allow_weak_rsa=True).bits == 1024


@pytest.mark.parametrize(
    "data,algorithm,message",
    [
        (pem(RSA, serialization.PrivateFormat.PKCS8), "ed25519-sha256", "the key is RSA but the algorithm is ed25519"),
        (pem(ED, serialization.PrivateFormat.PKCS8), "rsa-sha256", "the key is Ed25519 but the algorithm is rsa"),
        (
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
            "rsa-sha256",
            "could not be parsed",
        ),
        (b"not a key at all", "rsa-sha256", "not a PEM key and not a base64 Ed25519 seed"),
    ],
)
def test_unusable_material_is_named_without_echoing_it(data, algorithm, message):
    with pytest.raises(KeyMaterialError, match=message) as err:
        load(data, algorithm)
    assert "bm90IGEga2V5" not in str(err.value) and "MII" not in str(err.value)
