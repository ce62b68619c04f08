"""staleflow: learner."""
