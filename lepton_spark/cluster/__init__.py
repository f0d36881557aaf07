"""The barrier stage: ranks on Spark's executors, and the driver watching them.

:mod:`.stage` (the driver: ``run_barrier``), :mod:`.task` (one barrier task), :mod:`.child` and
:mod:`.rank_main` (one rank, one child process), :mod:`.topology` (slots per host),
:mod:`.horovod` (Horovod's environment and rendezvous), :mod:`.slots` (enough slots?),
:mod:`.channel` (events from the ranks), :mod:`.watchdog` (the stall watch),
:mod:`.interrupts` (Ctrl-C, SIGTERM), :mod:`.standalone` (a local Spark standalone cluster).
Importing the package imports none of them.
"""
