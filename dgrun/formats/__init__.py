"""Checkpoint readers, one module per format, each returning a `dgrun.checkpoint.Checkpoint`."""
