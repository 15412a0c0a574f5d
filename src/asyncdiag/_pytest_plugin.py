"""PLACEHOLDER: pytest plugin (issue 8). Inert until implemented."""
