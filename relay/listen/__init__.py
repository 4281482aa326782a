"""Listening: the SMTP edge (aiosmtpd), TLS, the PROXY protocol, and one client session."""
