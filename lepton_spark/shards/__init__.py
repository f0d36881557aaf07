"""The contract between Spark and the ranks: Arrow shard folders and how ranks read them.

:mod:`.format` (the file layout), :mod:`.manifest` (what a folder holds, which rank reads what),
:mod:`.deal` (the row blocks each rank reads, epoch by epoch),
:mod:`.commit` (attempt folders, the manifest written last), :mod:`.storage` (local paths and
``pyarrow.fs`` URIs), :mod:`.writer` (Spark's executors write the shards: the only module here
that imports pyspark), :mod:`.local` (the same without Spark), :mod:`.loader` (a rank's
rows as torch batches). Importing the package imports none of them.
"""
