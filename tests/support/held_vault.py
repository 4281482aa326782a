"""A Vault that holds every request until the test releases it.

A relay whose DKIM key is a `vault://` reference fetches it in `Relay.start`, before its
signal handlers are in place: while this Vault holds the request, the relay process is in
that known state (no sleep, no guess). Released, it answers as Vault's KV v2 engine does
(https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2), with token auth:
`auth/token/lookup-self` says the token never expires.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hvs.held-vault-test"  # noqa: S105 - a test token, given to the relay by env://
HOLD_LIMIT_S = 120.0  # a test that never releases still ends


class HeldVault:
    def __init__(self, secrets: dict[str, dict[str, str]]) -> None:
        """`secrets`: the KV v2 path under the mount `secret` (e.g. "relay/dkim") → its fields."""
        self.secrets = secrets
        self._released = threading.Event()
        self._held = threading.Condition()
        self._held_count = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())  # bound now, port 0
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def config(self) -> dict[str, str]:
        """The relay's `secrets.vault` section (the token comes from $RELAY_TEST_VAULT_TOKEN)."""
        return {"url": self.url, "auth": "token", "token": "env://RELAY_TEST_VAULT_TOKEN"}

    env = {"RELAY_TEST_VAULT_TOKEN": TOKEN}

    def wait_held(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` requests have arrived (the last ones held, unless released)."""
        with self._held:
            if not self._held.wait_for(lambda: self._held_count >= count, timeout):
                raise TimeoutError(f"{self._held_count} requests held, waited for {count}")

    def release(self) -> None:
        """Answer the held requests and every later one at once."""
        self._released.set()

    def hold(self) -> None:
        """Hold the requests that arrive from now on, until the next `release()`."""
        self._released.clear()

    @property
    def requests(self) -> int:
        """Requests that arrived so far (held or answered)."""
        with self._held:
            return self._held_count

    def __enter__(self) -> HeldVault:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        vault = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with vault._held:
                    vault._held_count += 1
                    vault._held.notify_all()
                vault._released.wait(HOLD_LIMIT_S)
                if self.headers.get("X-Vault-Token") != TOKEN:
                    return self._reply(403, {"errors": ["permission denied"]})
                if self.path == "/v1/auth/token/lookup-self":
                    return self._reply(200, {"data": {"ttl": 0, "renewable": False}})
                prefix = "/v1/secret/data/"
                fields = vault.secrets.get(self.path.removeprefix(prefix)) if self.path.startswith(prefix) else None
                if fields is None:
                    return self._reply(404, {"errors": []})
                return self._reply(200, {"data": {"data": fields, "metadata": {"version": 1}}})

            def _reply(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
