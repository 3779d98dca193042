"""tracecore kernels."""
