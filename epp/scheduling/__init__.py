"""The scheduler: filters -> weighted scorers -> picker over datastore snapshots.

Read `interface.py` first (the plugin contracts and the data a cycle takes and gives),
then `cycle.py` (what plugins read), `profile.py` and `scheduler.py`. The plugins
themselves are in `filters.py`, `scorers.py`, `pickers.py`; `epp.registry` lists them.
"""

from epp.scheduling.cycle import CycleState, Derived
from epp.scheduling.inflight import InFlightTracker
from epp.scheduling.interface import (
    Explanation,
    ProfileExplanation,
    SchedulingRequest,
    SchedulingResult,
)
from epp.scheduling.profile import Profile, SingleProfileHandler
from epp.scheduling.scheduler import Scheduler

__all__ = [
    "CycleState",
    "Derived",
    "Explanation",
    "InFlightTracker",
    "Profile",
    "ProfileExplanation",
    "Scheduler",
    "SchedulingRequest",
    "SchedulingResult",
    "SingleProfileHandler",
]
