"""Tests of examples/: they run as a user runs them, on the local[2] session."""
