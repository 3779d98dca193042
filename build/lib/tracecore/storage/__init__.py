"""tracecore storage."""
