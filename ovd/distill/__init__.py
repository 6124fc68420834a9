"""Region-based knowledge distillation data: proposal sources, CLIP region-embedding store, extraction.

from ovd.distill import ExtractionCfg, FileProposals, RegionStore, extract_region_embeddings
extract_region_embeddings(records, FileProposals("props.json"), clip, "output/rkd/coco_train", ExtractionCfg(k=5))
store = RegionStore.open("output/rkd/coco_train")
boxes, embeddings = store.lookup(image_id)  # float32[k, 4] original pixels, float32[k, D] unit norm
"""

from ovd.config import ExtractionCfg
from ovd.distill.crops import CropPreprocess, crop_box_pixels
from ovd.distill.extract import CropEncoder, extract_region_embeddings, weights_sha256
from ovd.distill.proposals import (
    DetectorProposals,
    FileProposals,
    Proposals,
    ProposalSource,
    build_proposal_source,
    clip_to_image,
    select_top_k,
)
from ovd.distill.store import (
    MergeInProgressError,
    RegionStore,
    merge_store,
    store_is_complete,
    write_region_store,
)

__all__ = [
    "CropEncoder",
    "CropPreprocess",
    "DetectorProposals",
    "ExtractionCfg",
    "FileProposals",
    "MergeInProgressError",
    "ProposalSource",
    "Proposals",
    "RegionStore",
    "build_proposal_source",
    "clip_to_image",
    "crop_box_pixels",
    "extract_region_embeddings",
    "merge_store",
    "select_top_k",
    "store_is_complete",
    "weights_sha256",
    "write_region_store",
]
