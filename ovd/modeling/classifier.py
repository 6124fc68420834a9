"""Zero-shot classifier: cosine similarity to CLIP text embeddings (METHOD §2.2, §10.1).

Shape shorthand: ``R`` regions, ``D'`` region feature dim, ``D`` CLIP embedding dim, ``C`` classes.

``logits = τ · n(W x) · [n(E) | 0]ᵀ (+ b)``: a learned projection ``W: D' → D``, L2-normalised,
against the frozen L2-normalised class embeddings ``E`` with an all-zero background column. The
background logit is therefore always ``b`` (0 without bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovd.errors import OVDError


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is a half type (autocast), unchanged in float32 / float64 (parity runs)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def normalized_vocabulary(class_embeddings: Tensor) -> Tensor:
    """``Tensor[C, D]`` → ``Tensor[C+1, D]``: L2-normalised rows plus a zero background row."""
    if class_embeddings.dim() != 2 or class_embeddings.shape[0] == 0:
        raise OVDError(f"class embeddings must be a non-empty (C, D) matrix, got {tuple(class_embeddings.shape)}")
    emb = F.normalize(class_embeddings.float(), dim=1)  # (C, D)
    return torch.cat([emb, emb.new_zeros(1, emb.shape[1])], dim=0)  # (C+1, D)


class ZeroShotClassifier(nn.Module):
    """Region features → class logits against a swappable vocabulary.

    Args:
        in_dim: region feature dim ``D'``.
        class_embeddings: ``Tensor[C, D]`` class text embeddings (normalised here).
        temperature: τ.
        use_bias: add a learnable scalar to every logit.
        bias_init: its initial value.
    """

    def __init__(
        self, in_dim: int, class_embeddings: Tensor, *, temperature: float, use_bias: bool, bias_init: float
    ) -> None:
        super().__init__()
        self.embed_dim = int(class_embeddings.shape[1])
        self.temperature = temperature
        self.linear = nn.Linear(in_dim, self.embed_dim)
        # The vocabulary is data, not a learned weight: it is not part of the state dict, so a
        # checkpoint loads whatever vocabulary the model currently holds.
        self.register_buffer("vocabulary", normalized_vocabulary(class_embeddings), persistent=False)
        self.bias = nn.Parameter(torch.tensor(float(bias_init))) if use_bias else None

    @property
    def num_classes(self) -> int:
        return int(self.vocabulary.shape[0]) - 1

    def set_vocabulary(self, class_embeddings: Tensor) -> None:
        """Replace the vocabulary with ``Tensor[C', D]`` embeddings (any ``C'``)."""
        if class_embeddings.dim() != 2 or class_embeddings.shape[1] != self.embed_dim:
            raise OVDError(
                f"class embeddings have shape {tuple(class_embeddings.shape)}; this model needs (C, {self.embed_dim})"
            )
        self.vocabulary = normalized_vocabulary(class_embeddings).to(self.vocabulary.device)

    def fc_weight_sum(self) -> Tensor:
        """A scalar touching the trainable weights (``* 0.0`` gives a graph-connected zero loss)."""
        return sum((p.sum() for p in self.parameters() if p.requires_grad), self.vocabulary.new_zeros(()))

    def project(self, x: Tensor) -> Tensor:
        """Region features ``Tensor[R, D']`` → embeddings ``Tensor[R, D]`` (not normalised)."""
        return self.linear(x)

    def classification_embedding(self, x: Tensor) -> Tensor:
        """Region features ``Tensor[R, D']`` → the embeddings ``Tensor[R, D]`` that are classified.

        The plain classifier classifies its projection; the weight-transfer classifier overrides this.
        """
        return self.project(x)

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[R, D']`` → logits ``Tensor[R, C+1]`` (last column = background)."""
        z = F.normalize(at_least_float32(self.classification_embedding(x)), dim=1)  # (R, D)
        logits = self.temperature * z @ self.vocabulary.T  # (R, C+1)
        if self.bias is not None:
            logits = logits + self.bias
        return logits
