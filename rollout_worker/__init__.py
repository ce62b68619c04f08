"""staleflow: rollout_worker."""
