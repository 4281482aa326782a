"""Fill a spool on a tiny filesystem until the disk is full (run inside a mount namespace
on a small tmpfs by tests/test_queue_disk_full.py). Prints one JSON object: what was
accepted, the refusal, and whether everything accepted is still intact and deliverable."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path


async def main(root: Path, reserve: int) -> None:
    from relay.errors import SmtpError
    from relay.queue.entry import QueueEntry, RecipientState
    from relay.queue.store import Spool

    spool = Spool(root, reserve_bytes=reserve)
    spool.open()
    body = b"From: app@example.com\r\nSubject: fill\r\n\r\n" + b"x" * 60_000 + b"\r\n"
    accepted: list[str] = []
    refusal = None
    for n in range(200):
        entry = QueueEntry(
            id=f"f{n:04d}",
            mail_from="app@example.com",
            recipients=[RecipientState("to@example.net")],
            created=time.time(),
        )
        try:
            held = await spool.put(entry, body)
        except SmtpError as exc:
            refusal = {"code": exc.code, "enhanced": exc.reply.enhanced, "label": exc.label}
            break
        held.release()
        accepted.append(entry.id)
    # A state update of a queued entry on the full disk must not damage it either.
    state_update = "ok"
    held = spool.lock(accepted[0])
    entry, _ = spool.read(held)
    entry.recipients[0].attempts = 1
    try:
        await spool.save(held, entry)
    except OSError as exc:
        state_update = f"refused: {exc.strerror}"
    held.release()
    await spool.close()
    reopened = Spool(root, reserve_bytes=reserve)
    reopened.open()
    intact = []
    for entry_id in accepted:
        held = reopened.lock(entry_id)
        intact.append(held is not None and reopened.read(held)[1] == body)
        if held is not None:
            held.release()
    print(
        json.dumps(
            {
                "accepted": len(accepted),
                "refusal": refusal,
                "intact": all(intact),
                "state_update": state_update,
                "corrupt": sorted(p.name for p in (root / "corrupt").iterdir()),
            }
        )
    )
    await reopened.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
