"""What operators look at: Prometheus metrics and their HTTP server with /livez and /readyz, the loop heartbeat,
the last step of shutdown."""
