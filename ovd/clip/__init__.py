"""CLIP for ``ovd``: a thin layer over open_clip (model building, text embeddings, their cache)."""

from ovd.clip.model import (
    CHECKPOINT_SUFFIXES,
    MODEL_CONFIG_DIR,
    ClipBundle,
    ClipSpec,
    create_clip,
    file_sha256,
    register_model_configs,
    save_clip_checkpoint,
)
from ovd.clip.text import (
    DEFAULT_TEMPLATES,
    ENSEMBLE_TEMPLATES,
    TextEmbeddings,
    build_text_embeddings,
    embedding_paths,
    get_or_build_text_embeddings,
    load_text_embeddings,
    save_text_embeddings,
    validate_templates,
    validate_vocabulary,
)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_TEMPLATES",
    "ENSEMBLE_TEMPLATES",
    "MODEL_CONFIG_DIR",
    "ClipBundle",
    "ClipSpec",
    "TextEmbeddings",
    "build_text_embeddings",
    "create_clip",
    "embedding_paths",
    "file_sha256",
    "get_or_build_text_embeddings",
    "load_text_embeddings",
    "register_model_configs",
    "save_clip_checkpoint",
    "save_text_embeddings",
    "validate_templates",
    "validate_vocabulary",
]
