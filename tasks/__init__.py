"""tracecore tasks."""
