"""Weight-transfer zero-shot classifier (METHOD §5, §10.8).

Shape shorthand: ``R`` regions, ``D'`` region feature dim, ``D`` CLIP embedding dim, ``H`` hidden dim
of the residual MLP.

The RKD stage learns a projection ``W_rkd: D' → D`` that maps region features into CLIP's image
space. The weight-transfer classifier keeps it **frozen** (it still feeds the RKD losses through
:meth:`project`) and classifies

``z = fc4(σ(fc3(x))) + x W_Tᵀ``, with ``W_T = fc2(σ(fc1(W_rkd)))``

where ``σ`` is one LeakyReLU(0.1): a learned function of the distilled projection plus a residual
MLP on the region features. The logits are the same cosine logits as :class:`ZeroShotClassifier`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ovd.modeling.classifier import ZeroShotClassifier


class WeightTransferClassifier(ZeroShotClassifier):
    """A :class:`ZeroShotClassifier` whose classified embedding goes through the weight-transfer function.

    Args:
        in_dim: region feature dim ``D'``.
        class_embeddings: ``Tensor[C, D]`` class text embeddings.
        temperature, use_bias, bias_init: as :class:`ZeroShotClassifier`.
        hidden_dim: ``H``, the width of the residual MLP ``fc3``/``fc4`` (1024 in the reference).
        negative_slope: the LeakyReLU slope (0.1 in the reference).

    ``linear`` (the RKD projection) is frozen; initialise it from the RKD checkpoint. ``fc1``–``fc4``
    keep ``nn.Linear``'s default initialisation, as in the reference.
    """

    def __init__(
        self,
        in_dim: int,
        class_embeddings: Tensor,
        *,
        temperature: float,
        use_bias: bool,
        bias_init: float,
        hidden_dim: int,
        negative_slope: float,
    ) -> None:
        super().__init__(in_dim, class_embeddings, temperature=temperature, use_bias=use_bias, bias_init=bias_init)
        self.linear.requires_grad_(False)
        d = self.embed_dim
        self.fc1 = nn.Linear(in_dim, d)  # each row of W_rkd (D') → D
        self.fc2 = nn.Linear(d, in_dim)  # ... and back to D'
        self.fc3 = nn.Linear(in_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, d)
        self.act = nn.LeakyReLU(negative_slope)

    def transferred_weight(self) -> Tensor:
        """``W_T = fc2(σ(fc1(W_rkd)))``: ``Tensor[D, D']``."""
        return self.fc2(self.act(self.fc1(self.linear.weight)))  # (D, D')

    def classification_embedding(self, x: Tensor) -> Tensor:
        """``z = fc4(σ(fc3(x))) + x W_Tᵀ``: ``Tensor[R, D']`` → ``Tensor[R, D]`` (no bias on the transfer term)."""
        return self.fc4(self.act(self.fc3(x))) + F.linear(x, self.transferred_weight())  # (R, D)
