"""The aiosmtpd/aiosmtplib patches (relay.listen.patches) change cost, never results."""

from __future__ import annotations

import asyncio
import inspect
import logging

import aiosmtpd.smtp
import pytest

from relay.listen import patches
from relay.listen.smtp import _Hooks

patches.apply()


class _WithOwnAttributes:
    kind = "class"

    def __init__(self) -> None:
        self.smtp_NOOP = "an instance attribute"
        self.zzz = 1


class _CustomDir:
    def __dir__(self) -> list[str]:
        return ["smtp_X", "handle_Y"]


class _Slotted:
    __slots__ = ("handle_Z",)


@pytest.mark.parametrize("make", [_Hooks, _WithOwnAttributes, _CustomDir, _Slotted, object])
def test_dir_in_aiosmtpd_gives_the_method_names_dir_gives(make):
    obj = make()
    expected = [name for name in dir(obj) if name.startswith(("smtp_", "handle_"))]
    for _ in range(2):  # the second time from the cache
        names = patches._method_names(obj)
        assert [name for name in names if name.startswith(("smtp_", "handle_"))] == expected


def test_the_protocol_finds_the_same_commands_and_hooks():
    loop = asyncio.new_event_loop()
    try:
        handler = _Hooks()
        protocol = aiosmtpd.smtp.SMTP(handler, hostname="relay.test", loop=loop)
        assert aiosmtpd.smtp.dir is patches._method_names
        commands = {name[5:] for name in dir(protocol) if name.startswith("smtp_")}
        hooks = {name[7:] for name in dir(handler) if name.startswith("handle_")}
        assert set(protocol._smtp_methods) == commands and "DATA" in commands
        assert set(protocol._handle_hooks) == hooks == {"PROXY"}
    finally:
        loop.close()


class _Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

    async def auth_PLAIN(self, server, args):  # shadows the protocol's own
        return None

    @aiosmtpd.smtp.auth_mechanism("X-NAMED")
    async def auth_CUSTOM(self, server, args):
        return None


class _Protocol(aiosmtpd.smtp.SMTP):
    async def smtp_XYZZY(self, arg):
        await self.push("250 nothing happens")


def _tables(protocol):
    return (
        {command: protocol._smtp_methods.get(command) for command in protocol._smtp_methods},
        protocol._handle_hooks,
        protocol._auth_methods,
        protocol._ehlo_hook_ver,
    )


@pytest.mark.parametrize("handler_class", [_Handler, _Hooks])
@pytest.mark.parametrize("exclude", [None, ["LOGIN"]])
def test_the_tables_made_once_per_class_are_aiosmtpds(mail_log, handler_class, exclude):
    logger, _ = mail_log
    loop = asyncio.new_event_loop()
    try:
        handler = handler_class()
        logger.setLevel(logging.INFO)  # aiosmtpd builds them itself (its line lists them)
        own = _Protocol(handler, hostname="relay.test", loop=loop, auth_exclude_mechanism=exclude)
        assert not isinstance(own._smtp_methods, patches.CommandTable)
        logger.setLevel(logging.WARNING)
        for _ in range(2):  # the second time from the cache
            protocol = _Protocol(handler, hostname="relay.test", loop=loop, auth_exclude_mechanism=exclude)
            assert isinstance(protocol._smtp_methods, patches.CommandTable)
            ours, theirs = _tables(protocol), _tables(own)
            assert [list(table) for table in ours[:3]] == [list(table) for table in theirs[:3]]
            assert ours[0]["XYZZY"].__func__ is _Protocol.smtp_XYZZY and ours[0]["XYZZY"].__self__ is protocol
            assert [getattr(h, "__func__", None) for h in ours[1].values()] == [
                getattr(h, "__func__", None) for h in theirs[1].values()
            ]
            assert [(a.method.__func__, a.is_builtin) for a in ours[2].values()] == [
                (a.method.__func__, a.is_builtin) for a in theirs[2].values()
            ]
            assert ours[3] == theirs[3]
            assert protocol._smtp_methods.get("NOPE") is None and "NOPE" not in protocol._smtp_methods
    finally:
        loop.close()


def test_objects_with_their_own_hooks_or_an_ehlo_hook_get_aiosmtpds_tables():
    loop = asyncio.new_event_loop()
    try:
        handler = _Handler()
        handler.handle_RCPT = "an instance attribute"  # type: ignore[attr-defined]
        protocol = _Protocol(handler, hostname="relay.test", loop=loop)
        assert protocol._handle_hooks["RCPT"] == "an instance attribute"

        class _WithEhlo(_Handler):
            async def handle_EHLO(self, server, session, envelope, hostname, responses):
                return responses

        protocol = _Protocol(_WithEhlo(), hostname="relay.test", loop=loop)
        assert protocol._ehlo_hook_ver == "new" and "EHLO" in protocol._handle_hooks
    finally:
        loop.close()


@pytest.fixture
def mail_log():
    logger = logging.getLogger("mail.log")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    yield logger, records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_command_lines_are_not_sanitized_for_a_level_that_is_off(mail_log, monkeypatch):
    logger, records = mail_log
    logger.setLevel(logging.WARNING)  # as the relay keeps it (relay.observe.logs)
    sanitized: list[bytes] = []
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", lambda text: sanitized.append(text) or text)
    aiosmtpd.smtp.sanitized_log(logger.info, "%r >> %r", "peer", b"AUTH PLAIN AGFwcABzZWNyZXQ=")
    aiosmtpd.smtp.sanitized_log(logger.debug, "readline: %r", b"AUTH PLAIN AGFwcABzZWNyZXQ=\r\n")
    assert sanitized == [] and records == []


def test_a_logged_command_line_still_hides_the_credentials(mail_log):
    logger, records = mail_log
    logger.setLevel(logging.DEBUG)
    aiosmtpd.smtp.sanitized_log(logger.info, "%r >> %r", "peer", b"AUTH PLAIN AGFwcABzZWNyZXQ=")
    aiosmtpd.smtp.sanitized_log(logger.debug, "readline: %r", b"AUTH PLAIN AGFwcABzZWNyZXQ=\r\n")
    assert [record.getMessage() for record in records] == [
        "'peer' >> b'AUTH PLAIN ********'",
        "readline: b'AUTH PLAIN ********\\r\\n'",
    ]


@pytest.mark.parametrize(
    "change",
    [
        lambda source: source + "\nnames = dir(something)\n",  # a third use of dir()
        lambda source: source.replace('if m.startswith("smtp_")', 'if m.startswith("cmd_")'),
        lambda source: source.replace("sanitized_log(log.info, ", "log.info("),
        lambda source: source.replace("self._smtp_methods: Dict[str, Any] = {", "self._commands = {"),
    ],
)
def test_check_refuses_an_aiosmtpd_the_patches_do_not_fit(monkeypatch, change):
    original = inspect.getsource
    changed = change(original(aiosmtpd.smtp))
    monkeypatch.setattr(inspect, "getsource", lambda obj: changed if obj is aiosmtpd.smtp else original(obj))
    with pytest.raises(patches.IncompatibleLibrary, match="aiosmtpd.smtp"):
        patches.check()
