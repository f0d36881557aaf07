"""Rank side only: what one rank does with its shards. No Spark, no MLflow (a test checks).

:mod:`.worker` (``train_worker``: the entry), :mod:`.job` (what goes in and comes out),
:mod:`.loop` (the supervised steps), :mod:`.kmeans` (Lloyd's iterations), :mod:`.devices`,
:mod:`.optim`, :mod:`.objectives` (losses and validation sums), :mod:`.checkpoint`,
:mod:`.heartbeat` (for the stall watch), :mod:`.faults` (for the tests). Importing the package
imports none of them.
"""
