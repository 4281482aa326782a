"""Count sending limits on a tiny filesystem that fills up (run inside a mount namespace on
a small tmpfs by tests/test_limits_counters.py). Prints one JSON object: how the takes on
the full disk ended and what `problem()` said. A process killed by a signal prints nothing."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path


async def main(root: Path) -> None:
    from relay.limits.counters import Demand, Taken
    from relay.limits.local import LocalCounters
    from relay.limits.rules import Entity, Limits

    limits = Limits(daily=1000)
    counters = LocalCounters(root / "limits")
    assert isinstance(await counters.take([Demand(Entity("user", "first"), limits, 1, 1)]), Taken)
    # The disk fills up (the spool on the same volume, logs, another pod's emptyDir).
    with open(root / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"x" * 65536)
                filler.flush()
        except OSError:
            pass
    # New users need new pages: each commit now needs a block the disk does not have.
    results = [await counters.take([Demand(Entity("user", f"u{i}"), limits, 1, 1)]) for i in range(300)]
    problem = counters.problem()
    await counters.close()
    print(json.dumps({"taken": sum(isinstance(r, Taken) for r in results), "problem": problem}))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
