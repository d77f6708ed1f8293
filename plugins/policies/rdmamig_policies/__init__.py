"""rdmamig's built-in unpin policies."""
