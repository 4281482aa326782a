"""Store-and-forward: the spool (`queue.mode: spool`).

In spool mode the client's 250 to DATA means "the signed message and its envelope are on
disk, fsynced"; delivery follows at once, through the same routes, pools, proxies and
failover as passthrough, and is retried per recipient until every recipient has a final
answer. The parts, in the order a message meets them:

- `entry`    the on-disk format: an immutable entry file (envelope + signed message) and a
             small `.state` file replaced whole by rename; both framed with their lengths
             and a CRC-32, so a torn or truncated file is quarantined, never delivered half.
- `journal`  group commit of new entries: the entry file is written without fsync and the
             same bytes appended to a per-process journal, one fdatasync per batch of
             concurrent messages; nobody is acknowledged before the sync that covers them.
             About once a second the still-queued entry files are fsynced on their own and
             the journal segment is dropped; a stopped process's segment is replayed.
- `commit`   durable writes of state files (and, without the journal, of entries): fsyncs
             in parallel, one directory fsync per batch.
- `store`    the spool directory: put, flock ownership, state changes (each one rename or
             one unlink), accounting against `max_bytes` and free disk (452 4.3.1), scans,
             quarantine of damaged files.
- `schedule` per-recipient retry steps with jitter, the last step repeating, `max_age`.
- `runner`   the delivery loop over the `relay.deliver.base` contract, dead letters kept
             for `dead_letter_age`, failure reports queued with the null sender.
- `dsn`      RFC 3464 delivery status notifications (RFC 3461 NOTIFY/ORCPT/RET/ENVID).
- `pacing`   `upstream.max_rate`: a token bucket around an upstream target.
- `admin`    `relay queue list|show|retry|delete|requeue`, safe while the relay runs.

Decisions, and why:

- Files per entry, not a log. Postfix and chasquid keep one file per message; it makes
  ownership (a lock per entry), inspection (`relay queue show`), deletion and quarantine
  local to one entry. The cost of a file is its fsyncs (one for the file, one for its
  directory: a journal commit of the filesystem each); measured (bench/spool_commit.py),
  they do not merge well when concurrent, so a short write-ahead journal carries new
  entries through their first second, when most of them are delivered and removed anyway.
- The message is written once; state changes go to a separate small file, so a retry of a
  25 MiB message rewrites a few hundred bytes, not the message (chasquid rewrites the whole
  item; Postfix flips a record in place).
- Dead letters stay in place, marked by their state, rather than moving to a directory of
  their own: a move of two files cannot be atomic, a state change can.
- Ownership by flock(2) on the entry file: the kernel drops it when its process dies, so a
  `kill -9` never leaves an entry owned by nobody until a lease runs out, and the
  `relay queue` command takes the same lock (it waits for a delivery under way).
- Between an upstream's 250 and the spool's record of it there is one syscall (a rename of
  a state file prepared and synced before DATA, or the unlink of a finished entry). A crash
  there delivers the message again: at-least-once, never lost.
"""
