"""Resilience policies as small composable objects: breaker, deadline, retry waits, balancing, batching,
hedging. The router combines them; each is tested on its own."""
