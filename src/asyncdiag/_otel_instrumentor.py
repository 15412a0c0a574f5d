"""PLACEHOLDER: opentelemetry_instrumentor entry point (issue 6)."""
