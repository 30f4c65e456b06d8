"""The embedding cache (issue 13)."""
