"""tracecore flows."""
