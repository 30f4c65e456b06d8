"""Control plane apart from data plane, for `serve --workers N`: the parent runs health checks,
agreement checks and managed servers once and publishes an immutable routing snapshot; each worker
serves requests from the latest snapshot it received."""
