"""deltaserve.delta_store."""
