"""`relay keygen --store file://…` writes through a temporary file that nothing planted
beside the key can redirect (issue 12, item 9)."""

from __future__ import annotations

import os
import stat

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
