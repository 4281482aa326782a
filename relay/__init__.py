"""relay: an SMTP relay proxy for private subnets."""

__version__ = "0.1.0"
