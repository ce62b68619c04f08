"""The staleflow dashboard: live and finished runs, served from the run directories' JSONL."""

from services.dashboard.server import serve, start_dashboard

__all__ = ["serve", "start_dashboard"]
