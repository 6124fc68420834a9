"""Zero-shot classifier (METHOD §10.1) and vocabulary swaps, incl. the real COCO CLIP embeddings."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.errors import OVDError
from ovd.modeling.classifier import ZeroShotClassifier

COCO_NPY = Path(__file__).parents[1] / "data" / "coco_clip_a+photo+cname.npy"


def _identity_classifier(emb: torch.Tensor, **kw) -> ZeroShotClassifier:
    clf = ZeroShotClassifier(emb.shape[1], emb, temperature=50.0, **kw)
    with torch.no_grad():
        clf.linear.weight.copy_(torch.eye(emb.shape[1]))
        clf.linear.bias.zero_()
    return clf


def test_logits_hand_computed():
    # projected x = [3, 4]; class embeddings [1, 0] and [0, 2] → 50·[0.6, 0.8, 0] = [30, 40, 0]
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    clf = _identity_classifier(emb, use_bias=False, bias_init=0.0)
    assert torch.allclose(clf(torch.tensor([[3.0, 4.0]])), torch.tensor([[30.0, 40.0, 0.0]]))
    biased = _identity_classifier(emb, use_bias=True, bias_init=-4.6)
    assert torch.allclose(biased(torch.tensor([[3.0, 4.0]])), torch.tensor([[25.4, 35.4, -4.6]]))


def test_logits_invariant_to_feature_scale():
    emb = torch.randn(5, 8)
    clf = ZeroShotClassifier(8, emb, temperature=50.0, use_bias=False, bias_init=0.0)
    x = torch.randn(3, 8)
    assert torch.allclose(clf(x), clf(x * 1.0), atol=1e-5)
    with torch.no_grad():
        clf.linear.bias.zero_()
    assert torch.allclose(clf(x), clf(3.0 * x), atol=1e-4)


def test_set_vocabulary_changes_classes_and_checks_dim():
    clf = ZeroShotClassifier(4, torch.randn(3, 6), temperature=50.0, use_bias=False, bias_init=0.0)
    x = torch.randn(2, 4)
    assert clf(x).shape == (2, 4)
    clf.set_vocabulary(torch.randn(7, 6))
    assert clf(x).shape == (2, 8) and clf.num_classes == 7
    with pytest.raises(OVDError, match=r"\(C, 6\)"):
        clf.set_vocabulary(torch.randn(7, 5))
    with pytest.raises(OVDError, match="non-empty"):
        clf.set_vocabulary(torch.zeros(0, 6))


def test_real_coco_clip_embeddings():
    emb = torch.from_numpy(np.load(COCO_NPY).astype(np.float32))  # (80, 512), rows ≈ norm 10
    assert emb.shape == (80, 512)
    clf = _identity_classifier(emb, use_bias=False, bias_init=0.0)
    assert torch.allclose(clf.vocabulary[:80].norm(dim=1), torch.ones(80), atol=1e-4)
    assert torch.equal(clf.vocabulary[80], torch.zeros(512))
    # a region whose embedding equals class k's text embedding scores k highest with logit τ
    logits = clf(emb[[0, 17, 79]])
    assert logits[:, :80].argmax(1).tolist() == [0, 17, 79]
    assert torch.allclose(logits[:, :80].max(1).values, torch.full((3,), 50.0), atol=1e-3)
    # "person" and "bicycle" are different but related: cosine well below 1
    assert logits[0, 1] < 50 * 0.95
