"""Missing training images are found before iteration 0; undecodable ones stop training (``error``) or
are skipped, logged, counted and capped (``skip``)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ovd.config import load_config
from ovd.data.catalog import get_dataset, register_dataset
from ovd.engine.trainer import train
from ovd.errors import OVDError

REPO = Path(__file__).parents[2]
pytestmark = pytest.mark.usefixtures("shared_datasets")


@pytest.fixture
def broken(tmp_path):
    """``ovshapes_broken``: 4 small train images: 2 good, 1 corrupt (bytes cut), 1 missing."""
    train = get_dataset("ovshapes_small_train")
    data = json.loads(Path(train.ann_file_path).read_text())
    images = data["images"][:4]
    root = tmp_path / "images"
    root.mkdir()
    for img in images[:3]:
        src = Path(train.image_root_path) / img["file_name"]
        (root / Path(img["file_name"]).name).write_bytes(src.read_bytes())
        img["file_name"] = Path(img["file_name"]).name
    (root / images[2]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt
    images[3]["file_name"] = "missing.png"
    ids = {img["id"] for img in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    ann = tmp_path / "broken.json"
    ann.write_text(json.dumps(data))
    register_dataset(replace(train, name="ovshapes_broken", ann_file=str(ann), image_root=str(root), prepare=None),
                     overwrite=True)  # fmt: skip
    return tmp_path, images[2]["file_name"]


def _cfg(*extra):
    return load_config(REPO / "configs/ovshapes/base.yaml", [
        "data.train=ovshapes_broken", "data.test=", "data.num_workers=0", "clip.pretrained=", "solver.ims_per_batch=2",
        "solver.max_iter=2", "solver.warmup_iters=1", "log_period=1", "input.min_size_train=[64]",
        "input.min_size_train_sampling=choice", *extra])  # fmt: skip


def test_missing_and_undecodable_images(broken, tmp_path):
    root, corrupt = broken
    with pytest.raises(OVDError, match=r"data.train.dataset: 1 of 4 images of training dataset 'ovshapes_broken' "
                                       r"are missing \(e.g. .*missing.png\).*data.bad_images=skip"):  # fmt: skip
        train(_cfg(), tmp_path / "a")
    assert not (tmp_path / "a" / "tensorboard").exists()  # found before the loader was even built
    with pytest.raises(OVDError, match=f"{corrupt}: cannot decode image"):  # the default policy: error
        train(_cfg("data.check_images=false"), tmp_path / "b")
    metrics = train(_cfg("data.bad_images=skip"), tmp_path / "c")  # 3 images left, the corrupt one skipped
    assert metrics["skipped_images"] >= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "c" / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("train/skipped_images")[-1].value == metrics["skipped_images"]
    # without the up-front check the missing file is skipped at run time too; any skip exceeds a cap of 0
    with pytest.raises(OVDError, match=r"more than data.max_bad_images=0 unreadable training images \(the last: "):
        train(_cfg("data.check_images=false", "data.bad_images=skip", "data.max_bad_images=0"), tmp_path / "d")
    with pytest.raises(OVDError, match=r"data.bad_images: unknown 'ignore' \(valid: error, skip\)"):
        train(_cfg("data.bad_images=ignore"), tmp_path / "e")
