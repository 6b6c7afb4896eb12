"""Student builders that record how the student's channels map to the teacher's.

``prune`` removes whole filters (and everything coupled to them) with torch-pruning's dependency
graph, falling back to fxkd's own coupling analyses (``chains``, ``streams``, ``lanes``) where
torch-pruning cannot analyse a model. ``decouple`` replaces each regular k×k conv by a depthwise
k×k conv and a pointwise 1×1 conv. The builders store the channel maps on the returned student
(attribute ``fxkd_channel_maps``), where ``fxkd.compress`` finds them.
"""

from fxkd.students.decoupling import decouple
from fxkd.students.pruning import (
    CHANNEL_MAPS_ATTR,
    SCOPES,
    TorchPruningError,
    channel_maps_of,
    prune,
)

__all__ = [
    "CHANNEL_MAPS_ATTR",
    "SCOPES",
    "TorchPruningError",
    "channel_maps_of",
    "decouple",
    "prune",
]
