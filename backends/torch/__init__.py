"""The torch backends: one batch-first forward (model.py) over ops chosen by device."""
