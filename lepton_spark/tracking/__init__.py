"""MLflow at the driver: the run, its tags and artifacts, live metrics, the registry, pictures.

:mod:`.target` (where runs go), :mod:`.run` (one run's lifecycle), :mod:`.tags`, :mod:`.live`
(rank events → metrics), :mod:`.artifacts`, :mod:`.registry` (candidate, champion, promote),
:mod:`.plots` (PNG bytes, matplotlib without pyplot's global state). The names of everything a
run records are in :mod:`lepton_spark.names`. Importing the package imports none of them.
"""
