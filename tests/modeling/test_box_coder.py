"""Box deltas of the RoI head (METHOD §10.9)."""

import torch
from torchvision.models.detection import _utils as det_utils

from ovd.modeling.roi_heads import DEFAULT_SCALE_CLAMP


def test_deltas_hand_computed_and_round_trip():
    coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0), bbox_xform_clip=DEFAULT_SCALE_CLAMP)
    proposal = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[2.0, 4.0, 14.0, 24.0]])
    # centers (5, 10) → (8, 14); sizes (10, 20) → (12, 20): [10·3/10, 10·4/20, 5·ln 1.2, 5·ln 1]
    deltas = coder.encode_single(gt, proposal)
    assert torch.allclose(deltas, torch.tensor([[3.0, 2.0, 0.911608, 0.0]]), atol=1e-5)
    assert torch.allclose(coder.decode_single(deltas, proposal), gt, atol=1e-4)
