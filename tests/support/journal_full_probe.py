"""A journal completion mark cut short by a full disk (run inside a mount namespace on a
small tmpfs by tests/test_queue_disk_full.py). Prints one JSON object: whether the mark was
torn, and whether the entry acknowledged after it is still vouched for by a segment."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

PAGE = 4096


async def main(root: Path) -> None:
    from relay.queue.entry import QueueEntry, RecipientState, encode_entry
    from relay.queue.journal import DONE, PUT, read_records
    from relay.queue.store import Spool

    spool = Spool(root, reserve_bytes=0)
    spool.open()
    assert spool.journal is not None
    spool.journal.checkpoint_interval = 3600.0  # one segment for the whole probe

    def entry(entry_id: str) -> QueueEntry:
        return QueueEntry(
            id=entry_id, mail_from="app@example.com", recipients=[RecipientState("to@example.net")], created=1.0
        )

    def segments() -> list[Path]:
        return sorted((root / "journal").glob("*.log"))

    done_id = "a0000001"
    held = await spool.put(entry(done_id), b"Subject: a\r\n\r\nfirst\r\n")
    # A padding entry sized so that the segment then ends 10 bytes before a page boundary:
    # the 18-byte completion mark of `done_id` needs a new page for its last 8 bytes.
    size = os.path.getsize(segments()[0])
    for pad in range(PAGE, 3 * PAGE):
        message = b"Subject: pad\r\n\r\n" + b"x" * pad + b"\r\n"
        padding = entry("p0000001")
        padding.owner, padding.size = spool.owner, len(message)
        record = 10 + len(padding.id) + len(encode_entry(padding, message))
        if (size + record) % PAGE == PAGE - 10:
            break
    (await spool.put(entry("p0000001"), message)).release()
    # The disk fills up (someone else's file), the entry is delivered: its mark is cut short.
    filler = root / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * PAGE):
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
    spool.remove(held)  # its lock still holds the entry's pages: nothing freed by the unlink
    segment = segments()[0]
    torn = os.path.getsize(segment) % PAGE == 0 and not any(
        kind == DONE for kind, _, _ in read_records(segment.read_bytes())
    )
    held.release()
    filler.unlink()  # space again: the next message is acknowledged
    time.sleep(0.1)
    (await spool.put(entry("b0000001"), b"Subject: b\r\n\r\nafter\r\n")).release()
    vouched = any(
        kind == PUT and ident == "b0000001" for seg in segments() for kind, ident, _ in read_records(seg.read_bytes())
    )
    print(json.dumps({"torn": torn, "vouched": vouched}))
    await spool.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
