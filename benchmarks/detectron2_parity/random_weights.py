"""The seeded weight generator that the detectron2 side (make_fixtures.py) and the ovd side (the parity
tests) share, so that a full-size R50 needs no stored weights: only its calibrated normalisation
statistics and one classifier bias travel in the fixture.

Every tensor of a detectron2 state dict is drawn from its own numpy ``PCG64`` stream, seeded by the
global seed and the CRC32 of its key (independent of the order of keys), as uniform doubles (the
bit generator's stream and ``Generator.random`` are stable across numpy versions), then scaled:

* conv / linear weights: ``U(-b, b)`` with ``b = sqrt(6 / fan_in)`` (He-uniform, ReLU gain);
* biases: ``U(-0.1, 0.1)``;
* FrozenBN ``weight`` ``U(0.5, 1.0)``, ``bias`` ``U(-0.2, 0.2)``, ``running_mean`` 0, ``running_var`` 1
  (make_fixtures.py then calibrates mean and variance on a photo so that activations stay O(1));
* the box-regression output layer and the RPN delta conv: scaled by 0.05 (small, informative deltas).

numpy only: this file must run both in detectron2's environment and in ovd's tests.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

SEED = 19


def _uniform(key: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(key.encode())]))
    return rng.random(n)  # float64 in [0, 1)


def random_weight(key: str, shape: list[int], seed: int = SEED) -> np.ndarray:
    """The float32 value of ``key`` (a detectron2 state-dict name) of ``shape``."""
    n = math.prod(shape)
    u = _uniform(key, n, seed)
    leaf = key.rsplit(".", 1)[-1]
    is_norm = ".norm." in key
    if is_norm and leaf == "running_mean":
        v = np.zeros(n)
    elif is_norm and leaf == "running_var":
        v = np.ones(n)
    elif is_norm and leaf == "weight":
        v = 0.5 + 0.5 * u
    elif is_norm and leaf == "bias":
        v = 0.4 * u - 0.2
    elif leaf == "weight" and len(shape) > 1:
        fan_in = math.prod(shape[1:])
        v = (2.0 * u - 1.0) * math.sqrt(6.0 / fan_in)
        if key.endswith(("bbox_pred.2.weight", "anchor_deltas.weight")):
            v = v * 0.05
    else:  # biases, scalar parameters
        v = 0.2 * u - 0.1
    return v.reshape(shape).astype(np.float32)


def random_state_dict(manifest: dict[str, list[int]], seed: int = SEED) -> dict[str, np.ndarray]:
    """``{key: float32 array}`` for every key of ``manifest`` (``{key: shape}``)."""
    return {k: random_weight(k, list(s), seed) for k, s in manifest.items()}


def aligned_classifier_weight(weight: np.ndarray, zs_weight: np.ndarray, alpha: float, seed: int = SEED) -> np.ndarray:
    """``weight + alpha · Ecᵀ Q``: a projection whose output moves along the class embeddings.

    ``weight`` is ``(D, D')`` (the layer that produces the classified embedding), ``zs_weight`` the
    classifier's ``(D, C+1)`` buffer; ``Ec`` are its class columns minus their mean (``(C, D)``) and ``Q`` a
    ``(C, D')`` uniform matrix of this module's generator. Computed in float64 and rounded once to float32,
    so both sides get the same bits whatever their BLAS.
    """
    emb = zs_weight[:, :-1].T.astype(np.float64)  # (C, D)
    centred = emb - emb.mean(axis=0, keepdims=True)  # (C, D)
    q = 2.0 * _uniform("classifier_alignment", emb.shape[0] * weight.shape[1], seed) - 1.0
    q = q.reshape(emb.shape[0], weight.shape[1]) * math.sqrt(3.0 / weight.shape[1])  # (C, D') unit-variance rows
    return (weight.astype(np.float64) + alpha * centred.T @ q).astype(np.float32)  # (D, D')
