"""staleflow: services."""
