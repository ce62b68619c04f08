"""staleflow: buffer."""
