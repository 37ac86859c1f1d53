"""deltaserve.engine."""
