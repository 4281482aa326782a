"""Who the client is: password hashes and the user directory (SMTP AUTH, RFC 4954)."""
