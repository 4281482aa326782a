"""DNS posture of the signing domains: SPF, DKIM records, DMARC."""
