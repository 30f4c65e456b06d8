"""Caller keys, per-key model access, quotas and usage (`[auth]`)."""
