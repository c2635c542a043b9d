"""Mail authentication: DKIM keys and signing, outbound TLS policy (and later SPF/DMARC/MTA-STS)."""
