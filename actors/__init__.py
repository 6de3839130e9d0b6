"""Ray actors: TP shard workers, groups, the leader loop (see DESIGN.md, Actors).

`TPGroup` is the API for the layers above: it places `opts.tp` `ShardWorker` actors with a
placement group, starts their process group, and streams generation from rank 0's `LeaderLoop`.
"""

from actors.group import GroupError, Health, TPGroup

__all__ = ["GroupError", "Health", "TPGroup"]
