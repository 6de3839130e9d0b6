"""Ray actors: TP shard workers, groups, the leader loop (see DESIGN.md, Actors)."""
