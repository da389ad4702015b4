"""The scheduler: filters -> weighted scorers -> picker over datastore snapshots.

Importing this package registers the built-in plugin types (filters, scorers, pickers and
the single-profile handler) under their upstream names.
"""

from epp.scheduling.framework import (
    CycleState,
    Explanation,
    Profile,
    ProfileExplanation,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
)
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling import filters, pickers, scorers  # noqa: F401,E402 - register plugin types

__all__ = [
    "CycleState",
    "Explanation",
    "InFlightTracker",
    "Profile",
    "ProfileExplanation",
    "Scheduler",
    "SchedulingRequest",
    "SchedulingResult",
]
