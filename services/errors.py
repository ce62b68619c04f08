"""How a run ends early: each failure the driver can name, with what it means for a resume."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """The run cannot go on; it stops cleanly (checkpoint if the learner lives) and can be resumed."""


class LearnerDied(RunFailed):
    """The learner actor's process is gone (killed, OOM, node lost)."""


class NotStarted(RunFailed):
    """A preflight failed (it cannot fit, it cannot be placed, the model is not there): nothing was trained."""


class WorkersLost(RunFailed):
    """A rollout worker keeps dying and its restarts (rollout.max_restarts) are used up."""
