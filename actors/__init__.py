"""Ray actors: TP shard workers and their groups (see DESIGN.md, Actors).

`TPGroup` is the Ray form of the serving contract (`ladder.engine.group.Group`): it places
`opts.tp` `ShardWorker` actors with a placement group, starts their process group, and streams
generation from rank 0's `Leader` (`ladder.engine.leader`).
"""

from actors.group import TPGroup
from ladder.engine.group import GroupError, Health

__all__ = ["GroupError", "Health", "TPGroup"]
