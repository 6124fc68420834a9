"""Readers of other frameworks' checkpoints (:mod:`ovd.compat.detectron2`)."""
