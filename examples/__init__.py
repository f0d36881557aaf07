"""Examples of lepton_spark.distributed.run: see examples/README.md."""
