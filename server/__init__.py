"""deltaserve.server."""
