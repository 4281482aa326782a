"""`relay keygen`: a DKIM key pair, optionally stored at a secret reference, and the DNS
record to publish (RFC 6376 §3.6.1, RFC 8463 §4)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys

from relay.secrets.base import SecretFetchError, SecretRef
from relay.sign.keys import generate_private_key, load_signing_key, private_key_pem, txt_strings, zone_line
from relay.sign.keyset import SELECTOR_SYNTAX
from relay.spf.record import cut

__all__ = ["keygen", "txt_strings", "zone_line"]  # txt_strings, zone_line: relay.rotate.publish uses them

_DOMAIN = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)+"  # RFC 1035 labels, 2 or more
_WRITABLE = ("file", "aws-sm")


def keygen(args: argparse.Namespace) -> int:
    if args.out:
        if args.store:
            print("relay keygen: give --store or --out, not both", file=sys.stderr)
            return 2
        args.store = "file://" + os.path.abspath(args.out)
    if not args.store and not args.print_private_key:
        # A TXT record for a key nobody kept would be published for nothing.
        print(
            "relay keygen: say where the private key goes: --store REF (file:///path, aws-sm://ID), "
            "--out FILE, or --print-private-key (PEM on stdout)",
            file=sys.stderr,
        )
        return 2
    # Usage errors before a key is made: a record that DNS cannot hold, or a --store the
    # command cannot write, would leave a key pair nobody can use.
    domain = args.domain.lower().rstrip(".")
    if not re.fullmatch(_DOMAIN, domain):
        print(f"relay keygen: -d: not a domain name: {cut(args.domain)!r}", file=sys.stderr)
        return 2
    if not re.fullmatch(SELECTOR_SYNTAX, args.selector):
        print(
            f"relay keygen: -s: not a selector (letters, digits, '.', '-', '_'): {cut(args.selector)!r}",
            file=sys.stderr,
        )
        return 2
    name = f"{args.selector}._domainkey.{domain}"
    if len(name) > 253 or any(len(label) > 63 for label in name.split(".")):
        # RFC 1035 §2.3.4: DNS could not hold the record.
        print(
            f"relay keygen: {cut(name)} is not a DNS name: labels of at most 63 characters, 253 in all",
            file=sys.stderr,
        )
        return 2
    if args.store:
        try:
            scheme = SecretRef.parse(args.store).scheme
        except ValueError as exc:
            print(f"relay keygen: --store: {exc}", file=sys.stderr)
            return 2
        if scheme not in _WRITABLE:
            print(f"relay keygen: --store supports file:// and aws-sm:// references, not {scheme}://", file=sys.stderr)
            return 2
        folder = os.path.dirname(SecretRef.parse(args.store).location)
        if scheme == "file" and not os.path.isdir(folder):
            print(f"relay keygen: --store: no such directory: {folder}", file=sys.stderr)
            return 2
    private = generate_private_key(args.algorithm, args.bits)
    pem = private_key_pem(private)
    key = load_signing_key(pem, domain=domain, selector=args.selector, algorithm=args.algorithm)
    if args.store:
        try:
            version = asyncio.run(_store(args, pem))
        except (SecretFetchError, ValueError) as exc:
            print(f"relay keygen: cannot store the key: {exc}", file=sys.stderr)
            return 1
        print(f"; private key stored at {args.store} (version {version})")
    value = key.txt_value()
    print(
        f"; DKIM record for {key.domain}, selector {key.selector}, {args.algorithm}"
        + (f" {key.bits} bits" if key.key_type == "rsa" else "")
    )
    print(zone_line(key.domain, key.selector, value))
    print(f"; value: {value}")
    print(
        "; config: " + f'{{domain: {key.domain}, selector: {key.selector}, key: "{args.store or "<secret ref>"}", '
        f"algorithm: {args.algorithm}}}"
    )
    if args.print_private_key:
        sys.stdout.write(pem.decode("ascii"))
    return 0


async def _store(args: argparse.Namespace, pem: bytes) -> str:
    ref = SecretRef.parse(args.store)
    if ref.scheme == "file":
        from relay.secrets.local import FileBackend

        return await FileBackend().store(ref, pem, force=args.force)
    if ref.scheme == "aws-sm":
        from relay.secrets.aws import AwsSecretsBackend

        backend = AwsSecretsBackend(region=args.aws_region, endpoint_url=args.aws_endpoint_url)
        try:
            return await backend.store(ref, pem)
        finally:
            await backend.close()
    raise ValueError(f"--store supports file:// and aws-sm:// references, not {ref.scheme}://")
