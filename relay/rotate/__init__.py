"""DKIM key rotation: a new selector, published, verified in DNS, switched, retired.

How the running relays learn the signing set (no restart)
---------------------------------------------------------
A domain can take its keys from a *key set* instead of static `dkim.keys` entries:

    dkim:
      key_sets:
        - domain: example.com
          key_set: "aws-sm://relay/dkim/example.com/key-set"    # the document below
          key: "aws-sm://relay/dkim/{domain}/{selector}"        # where new keys are stored
          selector: "s{date}"                                   # s20261115 (UTC date)
          algorithm: rsa-sha256                                 # of new keys; bits: 2048
          publish: "route53:Z0123456789ABC"                     # or print (a human does it)
      rotation: {overlap: 7d, grace: 7d, dns_wait: 30m, dns_poll: 30s, record_ttl: 3600,
                 max_key_age: 180d, route53: {region: null, endpoint_url: null}}

The key set is one JSON document in the secrets backend (`relay.sign.keyset`): the
domain's selectors, each with its private-key reference, algorithm, state and dates, and
the state of the rotation in progress. Only `relay dkim rotate` writes it. Every replica
reads it like any other secret reference, so it re-reads it every `secrets.refresh` (a
file:// document within seconds), fetches the references it names, and signs with the
entries whose state is `active`. All replicas therefore converge on the same signing set
within `secrets.refresh` of a change, without a signal or restart; each logs every change
of its signing set. The document holds references and public values only, never a key.

Static `dkim.keys` entries work as before. For a domain that has both, the static entries
are the key set's seed: they sign until the document first exists, the first rotation
copies them into it as active keys (`adopted`), and from then on the document alone
decides (the static entries can then be deleted from the config).

A key's states: `pending` (stored and being published; never signs) → `active` (signs)
→ `retired` (no longer signs; its record and secret stay for the grace period) → removed
from the document (record deleted, secret deleted; the selector is remembered in
`history` so that it is never reused).

The rotation (`relay.rotate.rotation`), one step at a time, each step written to the
document before the next begins, so a run that stops anywhere is resumed by the next:

    generate  make the key under a new (dated) selector, store it at `key`
    publish   UPSERT its TXT record in Route 53 (character-strings of at most 255 bytes),
              or print it for a human
    confirm   wait until the configured resolver serves a record that matches the key
              (the check `relay check` uses); then the new key signs beside the old
    overlap   after `overlap`, the old key stops signing
    grace     after `grace`, the old record and the old secret are removed

Never unsafe:
- the new key signs only after the resolver has served a record that matches it: a
  missing or different record, several records, or a DNS failure stop the run with the
  reason, and the next run asks again;
- the old key stops signing, and its record and secret are removed, only while DNS still
  serves the new key's record (checked again before each of those steps); so the old key
  is never deleted while it is the only one DNS serves;
- a record is removed only if it still holds the value rotation published for that key;
  a secret is deleted only if nothing else (another selector, a static entry) uses it;
- a document changed by someone else while a run works is not overwritten.

Time comes from a `Clock` (`relay.rotate.clock`), so tests run a week of rotation in
milliseconds; `plan()` (the dry run) says what the remaining steps are and when.
"""
