"""`relay keygen --store file://…` writes through a temporary file that nothing planted
beside the key can redirect (issue 12, item 9)."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from relay.secrets.base import SecretRef
from relay.secrets.local import FileBackend


async def test_a_symlink_at_the_old_temporary_name_is_not_followed(tmp_path):
    key = tmp_path / "dkim.key"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    # The name the temporary file used to have (predictable: the key's path and the pid).
    os.symlink(victim, f"{key}.tmp-{os.getpid()}")
    await FileBackend().store(SecretRef.parse(f"file://{key}"), b"PRIVATE KEY")
    assert victim.read_bytes() == b"precious"
    assert key.read_bytes() == b"PRIVATE KEY"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dkim.key", "dkim.key.tmp-" + str(os.getpid()), "victim"]


async def test_a_file_larger_than_any_secret_is_refused_unread(tmp_path):
    from relay.secrets.base import SecretFetchError
    from relay.secrets.local import MAX_SECRET_FILE_SIZE

    path = tmp_path / "big"
    path.write_bytes(b"k" * (MAX_SECRET_FILE_SIZE + 1))
    with pytest.raises(SecretFetchError, match=r"larger than 1024 KiB"):
        await FileBackend().fetch(SecretRef.parse(f"file://{path}"))
    path.write_bytes(b"k" * MAX_SECRET_FILE_SIZE)
    assert len((await FileBackend().fetch(SecretRef.parse(f"file://{path}"))).data) == MAX_SECRET_FILE_SIZE


async def test_a_fifo_or_a_directory_is_no_secret_and_does_not_block(tmp_path):
    from relay.secrets.base import SecretFetchError

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fetch = asyncio.ensure_future(FileBackend().fetch(SecretRef.parse(f"file://{fifo}")))
    try:
        # A bound, not a measure: the open blocked for good (waiting for a writer) before.
        done, _ = await asyncio.wait([fetch], timeout=30)
        assert done, "the fetch of a FIFO is still waiting"
        with pytest.raises(SecretFetchError, match=r"not a regular file"):
            fetch.result()
    finally:
        if not fetch.done():  # release the blocked open so that the thread ends
            os.close(os.open(fifo, os.O_WRONLY))
    with pytest.raises(SecretFetchError, match=r"not a regular file"):
        await FileBackend().fetch(SecretRef.parse(f"file://{tmp_path}"))


async def test_a_variable_that_is_not_utf8_is_read_as_its_bytes():
    from relay.secrets.local import EnvBackend

    value = await EnvBackend({"KEY": b"\xff\xfe-junk".decode("utf-8", "surrogateescape")}).fetch(
        SecretRef.parse("env://KEY")
    )
    assert value.data == b"\xff\xfe-junk"
    assert value.text() == "\ufffd\ufffd-junk"
