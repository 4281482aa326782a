"""RFC 7208 SPF as a library: `check_host()` over the DNS service, macro expansion (§7),
and the record analysis the posture report uses."""

from relay.spf.analyze import SpfRecordReport, analyze_record
from relay.spf.check import SpfResult, check_host
from relay.spf.record import MAX_DNS_TERMS

__all__ = ["MAX_DNS_TERMS", "SpfRecordReport", "SpfResult", "analyze_record", "check_host"]
