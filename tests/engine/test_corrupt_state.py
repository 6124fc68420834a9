"""A full disk and cut files: one clear error naming the file, what was finished stays intact, and the
same step succeeds once space is freed."""

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.engine.checkpoint import last_checkpoint, load_checkpoint, save_checkpoint
from ovd.errors import OVDError
from ovd.utils.io import DiskFullError


def _part(path: Path, n: int, seed: int) -> dict:
    from ovd.distill.store import STORE_FORMAT, write_part

    rng = np.random.default_rng(seed)
    k, d = 4, 64
    arrays = {
        "image_ids": np.arange(n, dtype=np.int64),
        "boxes": rng.uniform(0, 50, (n, k, 4)).astype(np.float32),
        "embeddings": rng.standard_normal((n, k, d)).astype(np.float16),
        "valid": np.ones((n, k), dtype=bool),
    }
    meta = {"format": STORE_FORMAT, "k": k, "embed_dim": d, "part": {"begin": 0, "end": n}}
    write_part(path, **arrays, meta=meta)
    return arrays


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_keeps_finished_work_and_the_rerun_succeeds(small_disk):
    from ovd.distill.store import read_part

    first = {"model": {"w": torch.ones(100_000)}, "iteration": 1}  # 0.4 MB
    second = {"model": {"w": torch.full((300_000,), 2.0)}, "iteration": 2}  # 1.2 MB
    save_checkpoint(small_disk / "model_0000001.pth", first)
    arrays = _part(small_disk / "parts" / "shard0-chunk0.npz", 50, 0)  # 30 kB
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * int(1.9 * 2**20))  # under 0.5 MB left
    with pytest.raises(OVDError, match=r"model_0000002.pth: disk full .*checkpoint: model_0000001.pth.*--resume"):
        save_checkpoint(small_disk / "model_0000002.pth", second)
    with pytest.raises(DiskFullError, match=r"shard0-chunk1.npz: disk full while writing it"):
        _part(small_disk / "parts" / "shard0-chunk1.npz", 1500, 1)
    assert sorted(p.name for p in small_disk.rglob("*") if p.name.startswith(".")) == []  # no partial files
    assert last_checkpoint(small_disk) == small_disk / "model_0000001.pth"
    assert torch.equal(load_checkpoint(small_disk / "model_0000001.pth")["model"]["w"], first["model"]["w"])
    assert np.array_equal(read_part(small_disk / "parts" / "shard0-chunk0.npz")[1]["boxes"], arrays["boxes"])
    filler.unlink()  # space freed: the same steps succeed
    save_checkpoint(small_disk / "model_0000002.pth", second)
    _part(small_disk / "parts" / "shard0-chunk1.npz", 1500, 1)
    assert load_checkpoint(last_checkpoint(small_disk))["iteration"] == 2


def test_cut_region_store_part_and_pseudo_label_file(tmp_path, monkeypatch):
    from ovd.data.catalog import get_dataset
    from ovd.data.coco import load_dataset
    from ovd.distill.store import read_part

    part = tmp_path / "parts" / "shard0-chunk0.npz"
    _part(part, 20, 0)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(OVDError, match=r"shard0-chunk0.npz: unreadable part file .*delete it to recompute"):
        read_part(part)
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path.parent / "datasets"))
    info = get_dataset("ovshapes_small_train")
    half = tmp_path / "pseudo.json"
    text = Path(info.ann_file_path).read_text()
    half.write_text(text[: len(text) // 2])  # a pseudo-label file cut in half
    with pytest.raises(OVDError, match=r"pseudo.json: malformed JSON"):
        load_dataset(replace(info, name="cut", ann_file=str(half), ann_type="pseudo", prepare=None))
    shutil.rmtree(tmp_path / "parts")
    assert json.loads(text)  # the source itself was intact
