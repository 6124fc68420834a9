"""Running a trained model outside the training loop: the checkpoint file format (:mod:`.checkpoint`),
the device choice (:mod:`.device`) and loading a trained detector (:mod:`.detector`).

It sits above :mod:`ovd.modeling` (it builds detectors) and below everything that uses a trained one
(:mod:`ovd.distill`, :mod:`ovd.pis`, :mod:`ovd.engine`, :mod:`ovd.predictor`, :mod:`ovd.export`).
"""
