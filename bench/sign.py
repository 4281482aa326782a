#!/usr/bin/env python3
"""Signing microbenchmark: DKIM signatures per second of a 5 KB message on one core.

Measures the relay's signing path (`relay.sign.dkim.DkimSigner`: dkimpy canonicalization,
the private-key operation through OpenSSL) for RSA-2048 and Ed25519, parse included, and
dkimpy's own `dkim.sign()` for comparison. 3 trials of 3 s each; prints ops/s per trial.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim  # noqa: E402

from relay.message import Message  # noqa: E402
from relay.sign.dkim import DkimSigner  # noqa: E402
from relay.sign.keys import generate_private_key, load_signing_key, private_key_pem  # noqa: E402

MESSAGE = (
    b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: a 5 KB message\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@example.com>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    + (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n" * 62)
)


def rate(fn, seconds: float = 3.0) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    print(f"message: {len(MESSAGE)} bytes; 3 trials of 3 s; ops/s")
    signer = DkimSigner(
        ["from", "to", "subject", "date", "message-id", "mime-version", "content-type"], ["from", "to", "subject"]
    )
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        pem = private_key_pem(generate_private_key(algorithm, 2048))
        key = load_signing_key(pem, domain="example.com", selector="s1", algorithm=algorithm)
        trials = [rate(lambda key=key: signer.sign(Message.parse(MESSAGE), [key])) for _ in range(3)]
        print(f"relay signer   {algorithm:<15} " + " / ".join(f"{t:,.0f}" for t in trials))
        if algorithm == "rsa-sha256":
            trials = [
                rate(
                    lambda pem=pem: dkim.sign(
                        MESSAGE, b"s1", b"example.com", pem, canonicalize=(b"relaxed", b"relaxed")
                    ),
                    3.0,
                )
                for _ in range(3)
            ]
            print(f"dkimpy sign()  {algorithm:<15} " + " / ".join(f"{t:,.0f}" for t in trials))


if __name__ == "__main__":
    main()
