"""What operators see: Langfuse traces, Prometheus metrics, request log lines, redaction, and health checks."""
