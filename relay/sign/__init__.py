"""DKIM signing (RFC 6376, RFC 8463): keys, the key ring, and the signer."""
