"""Loading the config: YAML → validated `Settings`, with errors that name the key path."""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from relay.config.schema import Settings, UpstreamSettings
from relay.config.units import HostPort
from relay.files import NotARegularFile, open_regular, read_at_most

# Field names whose values must never be echoed in an error, even when wrong.
_SECRET_FIELDS = {
    "password",
    "password_hash",
    "key",
    "token",
    "secret_id",
    "proxy_password",
    "client_secret",
    "client_certificate",
    "service_account",
}


class ConfigError(Exception):
    """One or more problems, each `(key path, message)`."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [
            f"{self.source}: invalid configuration ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''})"
        ]
        lines += [f"  {path or '(top level)'}: {message}" for path, message in self.problems]
        return "\n".join(lines)


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: YAML keeps only the
    last, so a second `clients:` section would silently drop the first (a policy with it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is given twice (first at line {first[key].start_mark.line + 1}); "
                    "YAML would keep only the last",
                    problem_mark=key_node.start_mark,
                )
            first[key] = key_node
        return super().construct_mapping(node, deep)


def config_path(cli_path: str | None) -> Path | None:
    """`-c FILE`, else `$RELAY_CONFIG`, else None (the embedded dev default)."""
    chosen = cli_path or os.environ.get("RELAY_CONFIG") or None
    return Path(chosen) if chosen else None


def load_settings(path: Path, *, offline: bool = False) -> Settings:
    """The validated settings of `path`. `offline`: syntax and meaning only, without looking
    at the files the config names (they may exist only where it is deployed)."""
    source = str(path)
    raw = _read_config(path, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(source, [("", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line}")]) from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [("", f"YAML syntax error at {where}{problem}")]) from None
    except RecursionError:
        # PyYAML composes and constructs recursively: thousands of nested [ or { (no config
        # nests more than a few levels).
        raise ConfigError(source, [("", "YAML nested too deeply")]) from None
    except ValueError as exc:
        # Python's own limit on integer digits (int_max_str_digits), met by a 5,000-digit number.
        raise ConfigError(source, [("", f"YAML value out of range: {str(exc).partition(':')[0]}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the file must hold a mapping of settings")])
    return settings_from_mapping(data, source, offline=offline)


# A config with thousands of users is well under a megabyte; more is the wrong file.
MAX_CONFIG_SIZE = 16 * 1024 * 1024


def _read_config(path: Path, source: str) -> bytes:
    """The file's bytes. A regular file or a pipe (`-c <(envsubst < relay.tpl)`); not a
    device (`/dev/zero` would be read without end) nor anything over MAX_CONFIG_SIZE."""
    try:
        raw = read_at_most(open_regular(path, fifo=True), MAX_CONFIG_SIZE)
    except NotARegularFile as exc:
        kind = "Is a directory" if exc.kind == "a directory" else "not a regular file"
        raise ConfigError(source, [("", f"cannot read: {kind}")]) from None
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(source, [("", f"larger than {MAX_CONFIG_SIZE // (1024 * 1024)} MiB: not a relay config")])
    return raw


def settings_from_mapping(data: dict[str, Any], source: str = "config", *, offline: bool = False) -> Settings:
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(dict(err)) for err in exc.errors()]) from None
    problems = list(_cross_checks(settings))
    if not offline:
        problems += file_problems(settings)
    if problems:
        raise ConfigError(source, problems)
    return settings


def _key_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "." in str(part) or " " in str(part):
            out += f"[{str(part)!r}]"  # a key that is data (a domain), not a field name
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    loc = list(err["loc"])
    # Union members show up as extra loc entries ("list[...]", "literal['auto']"); drop them.
    kind = err["type"]
    if kind == "invalid_key":
        # YAML keys may be numbers, booleans or null; pydantic puts the key itself in loc.
        key = err.get("input")
        shown = "null" if key is None else str(key).lower() if isinstance(key, bool) else repr(key)
        return _key_path(loc[:-1]), f"a key must be a name, not {shown}"
    loc = [p for p in loc if isinstance(p, int) or ("[" not in p and "(" not in p)]
    path = _key_path(loc)
    message = err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        field = str(loc[-1])
        known = _known_fields(loc[:-1])
        guess = difflib.get_close_matches(field, known, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        return path, f"unknown key{hint}"
    if kind == "missing":
        return path, "required key is missing"
    field = next((str(p) for p in reversed(loc) if isinstance(p, str)), "")
    value = err.get("input")
    if (
        kind != "value_error"
        and field not in _SECRET_FIELDS
        and isinstance(value, str | int | float | bool)
        and len(str(value)) <= 80
        and repr(value) not in message
    ):
        message += f" (got {value!r})"
    return path, message


def _known_fields(loc: list[Any]) -> list[str]:
    """The field names of the model at `loc`, to suggest a correction for a typo."""
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = _model_of(field.annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    metadata = getattr(annotation, "__origin__", None)
    if metadata is not None:
        return _model_of(metadata)
    return None


def _cross_checks(settings: Settings) -> Iterable[tuple[str, str]]:
    """Checks that span sections, reported at the key that has to change."""
    seen_names: dict[str, int] = {}
    binds: list[tuple[str, HostPort]] = []
    for i, listener in enumerate(settings.listeners):
        if listener.name in seen_names:
            yield f"listeners[{i}].name", f"{listener.name!r} is already used by listeners[{seen_names[listener.name]}]"
        seen_names.setdefault(listener.name, i)
        if clash := _bind_clash(listener.bind, binds):
            yield f"listeners[{i}].bind", clash
        binds.append((f"listeners[{i}]", listener.bind))
        if listener.tls != "none" and settings.tls.cert_file is None:
            yield "tls.cert_file", f"needed by listeners[{i}] ({listener.name}, tls: {listener.tls})"
        if listener.auth != "none" and listener.tls == "none" and not listener.bind.is_loopback:
            yield f"listeners[{i}].tls", "AUTH is only offered over TLS; a non-loopback listener needs tls"
        if listener.auth == "required" and not settings.clients.users:
            yield "clients.users", f"listeners[{i}] ({listener.name}) has auth: required but no users are configured"
    if clash := _bind_clash(settings.metrics.bind, binds):
        yield "metrics.bind", clash
    upstream_names: dict[str, int] = {}
    for i, upstream in enumerate(settings.upstream):
        if upstream.name:
            if upstream.name in upstream_names:
                first = upstream_names[upstream.name]
                yield f"upstream[{i}].name", f"{upstream.name!r} is already used by upstream[{first}]"
            upstream_names.setdefault(upstream.name, i)
        if upstream.mode == "outbox" and len(settings.upstream) > 1:
            yield f"upstream[{i}].mode", "outbox is a development target and cannot be combined with other upstreams"
        yield from _token_checks(f"upstream[{i}]", upstream)
    for i, route in enumerate(settings.routes):
        if route.upstream not in upstream_names:
            yield f"routes[{i}].upstream", f"no upstream is named {route.upstream!r}"
    if settings.secrets.vault is None:
        for i, key in enumerate(settings.dkim.keys):
            if key.key.startswith("vault://"):
                yield f"dkim.keys[{i}].key", "vault:// reference needs a secrets.vault section"
    rotation = settings.dkim.rotation
    if settings.dkim.key_sets and rotation.grace < settings.secrets.refresh:
        # Replicas stop signing with a retired key only when they next read the key set.
        yield (
            "dkim.rotation.grace",
            (
                f"must be at least secrets.refresh ({settings.secrets.refresh:g}s): "
                "replicas may sign with the old key until they re-read the key set"
            ),
        )
    # The backends' SDKs are extras (pyproject.toml): say which one, not an ImportError later.
    key_patterns = [(f"dkim.key_sets[{i}].key", ks.key) for i, ks in enumerate(settings.dkim.key_sets)]
    for key_path, ref in secret_references(settings) + key_patterns:
        scheme = ref.partition("://")[0]
        extra = _EXTRAS.get(scheme)
        if extra and any(importlib.util.find_spec(module) is None for module in extra[1]):
            yield key_path, f"{scheme}:// needs relay's {extra[0]} extra: pip install 'relay[{extra[0]}]'"
    if settings.limits is not None:
        yield from _limits_checks(settings)


def _bind_clash(bind: HostPort, taken: list[tuple[str, HostPort]]) -> str | None:
    """Why `bind` cannot be bound beside the earlier ones, or None. One port on the same
    address, or on the wildcard address and another of its family (0.0.0.0:587 covers
    127.0.0.1:587; asyncio binds IPv6 sockets V6ONLY), is refused by the kernel at start, or
    with --workers (SO_REUSEPORT) shared between them at random."""
    for owner, other in taken:
        if other.port == bind.port and _overlap(_address(bind.host), _address(other.host)):
            return f"{bind} overlaps {other} of {owner}: one port, one listener"
    return None


def _address(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


def _overlap(one: str, other: str) -> bool:
    if one == other:
        return True
    for wildcard, family in (("0.0.0.0", 4), ("::", 6)):  # noqa: S104 - compared with, not bound
        if wildcard in (one, other) and _family(one) == _family(other) == family:
            return True
    return False


def _family(host: str) -> int:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0  # a host name: compared by name only


def _token_checks(key: str, upstream: UpstreamSettings) -> Iterable[tuple[str, str]]:
    """An access token from client credentials acts for every mailbox the app may use,
    for up to an hour: it goes only over TLS, to an upstream whose certificate is checked."""
    if upstream.auth is None or not upstream.auth.uses_token:
        return
    mechanism = upstream.auth.effective_mechanism
    if upstream.auth.provider == "microsoft" and mechanism == "oauthbearer":
        yield f"{key}.auth.mechanism", "Exchange Online takes xoauth2 (it offers AUTH XOAUTH2, not OAUTHBEARER)"
    if upstream.effective_tls == "none":
        yield f"{key}.tls", f"auth.mechanism: {mechanism} sends a bearer token: it needs tls: starttls or implicit"
    elif not upstream.verify_tls:
        yield (
            f"{key}.verify_tls",
            f"auth.mechanism: {mechanism} sends a bearer token: only to a verified upstream "
            "(a private CA goes in upstream.ca_file)",
        )


MAX_GUESSES = 10


def _limits_checks(settings: Settings) -> Iterable[tuple[str, str]]:
    assert settings.limits is not None
    usernames = [user.username for user in settings.clients.users]
    known = set(usernames)
    # Each guess compares with every user name: with tens of thousands of users, a guess for
    # each of thousands of unknown names took minutes. The first few are enough to see a typo.
    guesses_left = MAX_GUESSES
    for username in settings.limits.users.model_extra or {}:
        if username not in known:
            hint = ""
            if guesses_left:
                guesses_left -= 1
                guess = difflib.get_close_matches(username, usernames, n=1)
                hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            yield _key_path(["limits", "users", username]), f"no user named {username!r} in clients.users{hint}"
    redis = settings.limits.redis
    if redis is not None and redis.ca_file is not None and not redis.ca_file.is_file():
        yield "limits.redis.ca_file", f"file not found: {redis.ca_file}"


# scheme → (extra, the modules it provides)
_EXTRAS = {"aws-sm": ("aws", ("aiobotocore", "aiohttp")), "vault": ("vault", ("aiohttp",))}


def file_problems(settings: Settings) -> list[tuple[str, str]]:
    """The files the config names that cannot be found here."""
    problems = []
    for name in ("cert_file", "key_file"):
        path = getattr(settings.tls, name)
        if path is not None and not path.is_file():
            problems.append((f"tls.{name}", f"file not found: {path}"))
    for i, upstream in enumerate(settings.upstream):
        if upstream.ca_file is not None and not upstream.ca_file.is_file():
            problems.append((f"upstream[{i}].ca_file", f"file not found: {upstream.ca_file}"))
        auth = upstream.auth
        if auth is not None and auth.ca_file is not None and not auth.ca_file.is_file():
            problems.append((f"upstream[{i}].auth.ca_file", f"file not found: {auth.ca_file}"))
    vault = settings.secrets.vault
    if vault is not None and vault.ca_file is not None and not vault.ca_file.is_file():
        problems.append(("secrets.vault.ca_file", f"file not found: {vault.ca_file}"))
    return problems


def secret_references(settings: Settings) -> list[tuple[str, str]]:
    """Every secret reference the config uses, with its key path (the order they load in:
    Vault's own credentials first, since they come from the other backends)."""
    found: list[tuple[str, str]] = []
    vault = settings.secrets.vault
    if vault is not None:
        found += [(f"secrets.vault.{n}", r) for n in ("token", "secret_id") if (r := getattr(vault, n))]
    found += [(f"dkim.keys[{i}].key", k.key) for i, k in enumerate(settings.dkim.keys)]
    found += [(f"dkim.key_sets[{i}].key_set", ks.key_set) for i, ks in enumerate(settings.dkim.key_sets)]
    found += [(f"clients.users[{i}].password", u.password) for i, u in enumerate(settings.clients.users) if u.password]
    for i, upstream in enumerate(settings.upstream):
        for name in ("password", "proxy_password"):
            if ref := getattr(upstream, name):
                found.append((f"upstream[{i}].{name}", ref))
        if upstream.auth is not None:
            for name in ("client_secret", "client_certificate", "service_account"):
                if ref := getattr(upstream.auth, name):
                    found.append((f"upstream[{i}].auth.{name}", ref))
    limits = settings.limits
    if limits is not None and limits.redis is not None and limits.redis.password:
        found.append(("limits.redis.password", limits.redis.password))
    return found


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective config for the startup log. References are kept (they are not
    secret); password hashes are cut to their scheme."""
    data = settings.model_dump(mode="json")
    for user in data["clients"]["users"]:
        if user.get("password_hash"):
            user["password_hash"] = "scrypt$<redacted>"  # noqa: S105 - the redaction marker
    for upstream in data["upstream"]:
        proxy = upstream.get("proxy")
        if proxy and "@" in proxy:
            scheme, _, rest = proxy.partition("://")
            userinfo, _, hostpart = rest.rpartition("@")
            upstream["proxy"] = f"{scheme}://{userinfo.partition(':')[0]}:<redacted>@{hostpart}"
    redis = (data.get("limits") or {}).get("redis")
    if redis and redis.get("url"):
        redis["url"] = redacted_url(redis["url"])
    return data


def redacted_url(value: str) -> str:
    """A URL without what may carry a secret: the userinfo's password and the query
    (validation refuses both for limits.redis.url; this holds should that ever change)."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    rest, query, _ = rest.partition("?")
    rest = rest.partition("#")[0]
    userinfo, at, hostpart = rest.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        rest = f"{user}:<redacted>@{hostpart}" if ":" in userinfo else f"{user}@{hostpart}"
    return f"{scheme}://{rest}" + ("?<redacted>" if query else "")
