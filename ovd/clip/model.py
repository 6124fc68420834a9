"""A CLIP model built by open_clip, with the bookkeeping ``ovd`` needs (which weights, their hash).

Shape legend: ``N`` texts, ``B`` images, ``D`` CLIP embedding dim, ``H×W`` CLIP input size.

Weights come from one of three places, all resolved by open_clip itself:

* ``pretrained=None``: random init (tests, and the start of OV-Shapes teacher training);
* an open_clip pretrained tag such as ``"openai"``: downloaded/cached by open_clip;
* a path to a local checkpoint file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``) holding an open_clip
  state dict, e.g. one written by :func:`save_clip_checkpoint`.

The package ships small architectures in ``ovd/clip/model_configs/*.json`` (``ovd-tiny``: a 64×64
ViT with a 2-layer text tower, ``D = 64``) that :func:`register_model_configs` adds to open_clip's
registry, so they are built exactly like ``ViT-B-32``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from ovd.errors import OVDError
from ovd.utils.io import atomic_write

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
"""Folder of the open_clip architecture configs shipped with ``ovd`` (one ``<name>.json`` each)."""

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
"""File suffixes open_clip loads as a full CLIP state dict (``.npz``/``.npy`` mean big_vision weights)."""

_HASH_CHUNK_BYTES = 1 << 20
_MAX_ERROR_CHARS = 300
_registered = False


def register_model_configs() -> None:
    """Add the architectures in :data:`MODEL_CONFIG_DIR` to open_clip's registry (idempotent)."""
    global _registered
    if _registered:
        return
    from ovd.clip.tiny_cnn import register_timm_models

    register_timm_models()  # image towers named by the configs below
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(e: BaseException) -> str:
    """An exception message on one line, truncated, for one-line error reports."""
    text = " ".join(str(e).split())  # all lines, whitespace collapsed
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP: an open_clip architecture name and where its weights come from.

    Attributes:
        model_name: open_clip architecture name, e.g. ``"ViT-B-32"`` or ``"ovd-tiny"``.
        pretrained: an open_clip tag (``"openai"``), a checkpoint file path, or None (random init).
        checkpoint_sha256: SHA-256 of the checkpoint file; None for tags and random init. Filled
            in by :meth:`resolve`.
    """

    model_name: str
    pretrained: str | None = None
    checkpoint_sha256: str | None = None

    @classmethod
    def resolve(cls, model_name: str, pretrained: str | os.PathLike[str] | None = None) -> ClipSpec:
        """Validate a (model, weights) pair and canonicalise it, without building the model.

        The model name gets open_clip's ``/`` → ``-`` spelling; a tag gets open_clip's lower-case
        ``_`` spelling; a checkpoint file is hashed.

        Raises:
            OVDError: unknown model name (with close matches), unknown tag for that model, or a
                checkpoint path that does not exist.
        """
        register_model_configs()
        name = str(model_name).replace("/", "-")
        models = open_clip.list_models()
        if name not in models:
            close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise OVDError(f"unknown open_clip model {model_name!r}{hint}", field="model_name")
        if pretrained is None or str(pretrained) == "":
            return cls(name, None, None)
        weights = str(pretrained)
        if open_clip.get_pretrained_cfg(name, weights):
            return cls(name, weights.lower().replace("-", "_"), None)
        path = Path(weights).expanduser()
        if path.is_file():
            return cls(name, str(path), file_sha256(path))
        if path.suffix in CHECKPOINT_SUFFIXES or os.sep in weights or "/" in weights:
            raise OVDError("CLIP checkpoint file not found", path=path)
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise OVDError(
            f"{weights!r} is neither an open_clip pretrained tag for {name} ({known}) nor an existing checkpoint file",
            field="pretrained",
        )


@functools.lru_cache(maxsize=8)
def _tokenizer(model_name: str) -> Callable[..., Tensor]:
    """open_clip's tokenizer for an architecture (cached: building one reads the BPE vocabulary)."""
    return open_clip.get_tokenizer(model_name)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and without gradients, restoring the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@dataclass(eq=False)
class ClipBundle:
    """An open_clip model with its tokenizer, eval transform and provenance.

    Attributes:
        model: the open_clip ``CLIP`` module, in eval mode (parameters stay trainable).
        tokenizer: open_clip tokenizer: ``list[str] -> LongTensor[N, context_length]``.
        preprocess: open_clip validation transform: PIL image -> ``Tensor[3, H, W]``.
        model_name: canonical open_clip architecture name.
        pretrained: canonical tag, checkpoint path (``~`` expanded), or None (random init).
        embed_dim: ``D``.
        image_size: ``(H, W)`` of the image tower's input.
        checkpoint_sha256: SHA-256 of the checkpoint file, or None for a tag / random init.
    """

    model: nn.Module
    tokenizer: Callable[..., Tensor]
    preprocess: Callable[[Any], Tensor]
    model_name: str
    pretrained: str | None
    embed_dim: int
    image_size: tuple[int, int]
    checkpoint_sha256: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def spec(self) -> ClipSpec:
        """The (model, weights, hash) triple this bundle was built from."""
        return ClipSpec(self.model_name, self.pretrained, self.checkpoint_sha256)

    def encode_text(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """Encode texts with the text tower.

        Args:
            texts: ``N`` strings (prompts, already filled in).
            batch_size: texts per forward pass.

        Returns:
            ``Tensor[N, D]`` float32 on the model's device, **not** normalised.
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, not one string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.device
        out = [torch.zeros(0, self.embed_dim, device=device)]
        with eval_mode(self.model):
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(device)  # (n, L)
                out.append(self.model.encode_text(tokens, normalize=False).float())  # (n, D)
        return torch.cat(out)  # (N, D)

    def encode_images(self, images: Tensor) -> Tensor:
        """Encode images that already went through :attr:`preprocess`.

        Args:
            images: ``Tensor[B, 3, H, W]`` with ``(H, W) == image_size``.

        Returns:
            ``Tensor[B, D]`` float32 on the model's device, **not** normalised.
        """
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"expected images of shape (B, 3, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(images.shape)}"
            )
        with eval_mode(self.model):
            return self.model.encode_image(images.to(self.device), normalize=False).float()  # (B, D)


def create_clip(
    model_name: str,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """Build an open_clip model, its tokenizer and eval transform (fp32).

    Args:
        model_name: open_clip architecture (``"ViT-B-32"``; ``"ViT-B/32"`` is accepted) or one of the
            ``ovd`` configs (``"ovd-tiny"``).
        pretrained: open_clip tag (``"openai"``), path to a checkpoint file, or None for random init.
            For a tag trained with QuickGELU (OpenAI weights) on a config without it, QuickGELU is
            switched on, as the original OpenAI model has it (METHOD §11).
        device: where to put the model.

    Returns:
        A :class:`ClipBundle` with the model in eval mode.

    Raises:
        OVDError: unknown model or tag, missing checkpoint, weights of a tag not available locally,
            or a checkpoint that is unreadable or does not fit the architecture.
    """
    spec = ClipSpec.resolve(model_name, pretrained)
    force_quick_gelu = False
    tag_cfg: dict[str, Any] = {}
    if spec.pretrained is not None and spec.checkpoint_sha256 is None:
        tag_cfg = open_clip.get_pretrained_cfg(spec.model_name, spec.pretrained)
        model_cfg = open_clip.get_model_config(spec.model_name) or {}
        force_quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model_name,
            pretrained=spec.pretrained,
            device=device,
            force_quick_gelu=force_quick_gelu,
        )
    except Exception as e:  # open_clip raises RuntimeError/UnpicklingError/KeyError/... from many layers
        if spec.checkpoint_sha256 is not None:
            what = (
                f"its weights do not fit the {spec.model_name} architecture"
                if "loading state_dict" in str(e)
                else "not a readable open_clip state dict"
            )
            raise OVDError(f"cannot load CLIP checkpoint: {what} ({_short(e)})", path=spec.pretrained) from e
        if spec.pretrained is not None:
            source = tag_cfg.get("hf_hub") or tag_cfg.get("url") or "its open_clip source"
            raise OVDError(
                f"weights for open_clip tag {spec.pretrained!r} of {spec.model_name} are not available "
                f"locally and could not be downloaded; fetch the state dict from {source} elsewhere and "
                f"pass the file as pretrained (--pretrained PATH) ({_short(e)})",
                field="pretrained",
            ) from e
        raise
    model.eval()
    tokenizer = _tokenizer(spec.model_name)
    image_size = model.visual.image_size
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    embed_dim = int(open_clip.get_model_config(spec.model_name)["embed_dim"])
    logger.info("built CLIP %s (weights: %s) on %s", spec.model_name, spec.pretrained or "random init", device)
    return ClipBundle(
        model=model,
        tokenizer=tokenizer,
        preprocess=preprocess,
        model_name=spec.model_name,
        pretrained=spec.pretrained,
        embed_dim=embed_dim,
        image_size=(int(image_size[0]), int(image_size[1])),
        checkpoint_sha256=spec.checkpoint_sha256,
    )


def save_clip_checkpoint(model: nn.Module | ClipBundle, path: str | os.PathLike[str]) -> str:
    """Write a plain open_clip state dict atomically; ``create_clip(name, pretrained=path)`` loads it.

    Args:
        model: the open_clip model (or a bundle holding it).
        path: output file; ``.safetensors`` is written with safetensors, the other
            :data:`CHECKPOINT_SUFFIXES` with ``torch.save``.

    Returns:
        The SHA-256 of the written file (what :attr:`ClipBundle.checkpoint_sha256` will be).
    """
    module = model.model if isinstance(model, ClipBundle) else model
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise OVDError(f"CLIP checkpoint must end in one of {', '.join(CHECKPOINT_SUFFIXES)}", path=path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, tmp))
    else:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    return file_sha256(path)
