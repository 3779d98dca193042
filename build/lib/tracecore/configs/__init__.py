"""tracecore configs."""
