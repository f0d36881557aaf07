"""The driver-side ETL on Spark: session, sources and SQL, features and label, the split.

:mod:`.session` (the SparkSession), :mod:`.sources` (views and the SQL transform),
:mod:`.columns` (types), :mod:`.quality` (bad values), :mod:`.features` (encoding),
:mod:`.text` (tokens), :mod:`.prepare` (the split), :mod:`.fingerprint` (what the shards were
made from), :mod:`.datagen` (generated tables). Importing the package imports none of them.
"""
