"""The region store: write → open → lookup round trip, validation errors, parts and merging."""

import json
import pickle

import numpy as np
import pytest

from ovd.distill.store import (
    META_FILE,
    PARTS_DIR,
    RegionStore,
    content_key,
    expected_parts,
    merge_store,
    part_path,
    read_part,
    shard_chunks,
    store_is_complete,
    write_part,
    write_region_store,
)
from ovd.errors import OVDError

N, K, D = 4, 3, 8
PROVENANCE = {
    "dataset": "toy",
    "nms_thresh": 0.5,
    "clip": {"model": "ovd-tiny", "pretrained": None, "checkpoint_sha256": None, "weights_sha256": "w"},
    "proposals": {"kind": "file", "path": "/a/props.json", "sha256": "p"},
}


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([11, 5, 42, 7], dtype=np.int64)
    valid = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)  # image 42 has no region
    xy = rng.uniform(0, 50, (N, K, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (N, K, 2))], axis=2).astype(np.float32)  # (N, K, 4)
    emb = rng.normal(size=(N, K, D))
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)  # (N, K, D) unit rows
    boxes[~valid] = 0
    emb[~valid] = 0
    return ids, boxes, emb, valid


def test_round_trip(tmp_path):
    ids, boxes, emb, valid = _arrays()
    path = write_region_store(
        tmp_path / "store", image_ids=ids, boxes=boxes, embeddings=emb, valid=valid, metadata=PROVENANCE
    )
    assert store_is_complete(path)
    store = RegionStore.open(path)
    assert len(store) == N and store.k == K and store.embed_dim == D
    meta = store.metadata
    assert meta["format"] == "ovd-region-store" and meta["version"] == 1 and meta["dataset"] == "toy"
    assert (meta["num_images"], meta["k"], meta["embed_dim"]) == (N, K, D)
    assert meta["num_regions"] == 3 + 1 + 0 + 2 and meta["num_images_without_regions"] == 1
    assert meta["proposals"]["path"] == "/a/props.json" and "created" in meta
    # the arrays on disk are exactly what the format says
    assert np.load(path / "embeddings.npy").dtype == np.float16
    assert np.load(path / "boxes.npy").shape == (N, K, 4)
    for row, image_id in enumerate(ids):
        b, e = store.lookup(int(image_id))
        n = int(valid[row].sum())
        assert b.shape == (n, 4) and e.shape == (n, D)
        assert b.dtype == np.float32 and e.dtype == np.float32
        np.testing.assert_array_equal(b, boxes[row][valid[row]])
        np.testing.assert_allclose(e, emb[row][valid[row]], atol=1e-3)  # fp16: 11-bit mantissa
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-3)
    b, e = store.lookup(42)  # in the store, no regions
    assert b.shape == (0, 4) and e.shape == (0, D) and 42 in store
    b, e = store.lookup(999)  # not in the store: empty too; missing() tells them apart
    assert b.shape == (0, 4) and e.shape == (0, D) and 999 not in store
    assert store.missing([5, 999, 42, 1000]) == [999, 1000]
    assert np.int64(7) in store and "7" not in store
    again = pickle.loads(pickle.dumps(store))  # re-opens from the path, no array copy
    np.testing.assert_array_equal(again.lookup(11)[0], boxes[0])


def test_open_errors(tmp_path):
    with pytest.raises(OVDError, match="not a region store"):
        RegionStore.open(tmp_path)
    (tmp_path / PARTS_DIR).mkdir()
    with pytest.raises(OVDError, match="incomplete region store"):
        RegionStore.open(tmp_path)
    ids, boxes, emb, valid = _arrays()
    path = write_region_store(
        tmp_path / "s", image_ids=ids, boxes=boxes, embeddings=emb, valid=valid, metadata=PROVENANCE
    )
    np.save(path / "valid.npy", valid[:, :2])
    with pytest.raises(OVDError, match=r"valid\.npy: expected bool\[4, 3\], got bool\[4, 2\]"):
        RegionStore.open(path)
    np.save(path / "valid.npy", valid)
    (path / "boxes.npy").write_bytes(b"garbage")
    with pytest.raises(OVDError, match=r"boxes\.npy: cannot read array"):
        RegionStore.open(path)
    (path / "boxes.npy").unlink()
    with pytest.raises(OVDError, match=r"boxes\.npy: region store array missing"):
        RegionStore.open(path)
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(OVDError, match="version 99 is not supported"):
        RegionStore.open(path)
    with pytest.raises(OVDError, match="duplicate image ids"):
        write_region_store(
            tmp_path / "d",
            image_ids=np.array([1, 1, 2, 3]),
            boxes=boxes,
            embeddings=emb,
            valid=valid,
            metadata=PROVENANCE,
        )


def test_content_key_ignores_paths_and_stats():
    a = {**PROVENANCE, "num_regions": 3, "created": "x"}
    b = {**PROVENANCE, "clip": {**PROVENANCE["clip"], "pretrained": "/elsewhere/w.pt"}, "num_regions": 9}
    b["proposals"] = {**PROVENANCE["proposals"], "path": "/mnt/props.json"}
    assert content_key(a) == content_key(b)
    c = {**PROVENANCE, "clip": {**PROVENANCE["clip"], "weights_sha256": "other"}}
    assert content_key(a) != content_key(c)


def test_shard_chunks_cover_every_image_once():
    # 10 images, 3 shards -> shard sizes 4, 3, 3; chunks of 2
    chunks = [shard_chunks(10, 3, s, 2) for s in range(3)]
    assert chunks == [[range(0, 2), range(2, 4)], [range(4, 6), range(6, 7)], [range(7, 9), range(9, 10)]]
    assert [len(shard_chunks(2, 3, s, 4)) for s in range(3)] == [1, 1, 0]  # an empty shard has no chunk


def _part_meta(begin, end, shard, chunk, **extra):
    meta = {**PROVENANCE, "format": "ovd-region-store", "version": 1, "num_images": N, "k": K, "embed_dim": D}
    meta["image_ids_sha256"] = extra.pop("ids_sha", None)
    meta["layout"] = {"num_shards": 2, "chunk_size": 1}
    meta["part"] = {"shard_index": shard, "chunk_index": chunk, "begin": begin, "end": end}
    return {**meta, **extra}


def test_merge_parts(tmp_path):
    from ovd.distill.store import image_ids_sha256

    ids, boxes, emb, valid = _arrays()
    sha = image_ids_sha256(ids)
    # layout: 2 shards of 2 images, chunks of 1 image -> 4 parts
    wanted = expected_parts(tmp_path, N, 2, 1)
    assert [p.name for p in wanted] == [
        "shard0-chunk0.npz",
        "shard0-chunk1.npz",
        "shard1-chunk0.npz",
        "shard1-chunk1.npz",
    ]
    for i, p in enumerate(wanted[:3]):
        sl = slice(i, i + 1)
        write_part(
            p,
            image_ids=ids[sl],
            boxes=boxes[sl],
            embeddings=emb[sl].astype(np.float16),
            valid=valid[sl],
            meta=_part_meta(i, i + 1, i // 2, i % 2, ids_sha=sha),
        )
    meta, data = read_part(wanted[0])
    assert meta["part"]["begin"] == 0 and data["embeddings"].dtype == np.float16
    with pytest.raises(OVDError, match=r"1 of 4 parts missing \(e.g. shard1-chunk1.npz\)"):
        merge_store(tmp_path)
    assert not store_is_complete(tmp_path)
    # a part of another extraction (other K... here other NMS) is refused
    write_part(
        wanted[3],
        image_ids=ids[3:],
        boxes=boxes[3:],
        embeddings=emb[3:].astype(np.float16),
        valid=valid[3:],
        meta=_part_meta(3, 4, 1, 1, ids_sha=sha, nms_thresh=0.7),
    )
    with pytest.raises(OVDError, match="shard1-chunk1.npz: part comes from a different extraction"):
        merge_store(tmp_path)
    assert not store_is_complete(tmp_path) and not (tmp_path / "boxes.npy").exists()
    write_part(
        wanted[3],
        image_ids=ids[3:],
        boxes=boxes[3:],
        embeddings=emb[3:].astype(np.float16),
        valid=valid[3:],
        meta=_part_meta(3, 4, 1, 1, ids_sha=sha),
    )
    merge_store(tmp_path)
    assert store_is_complete(tmp_path) and not (tmp_path / PARTS_DIR).exists()
    store = RegionStore.open(tmp_path)
    np.testing.assert_array_equal(store.image_ids, ids)
    np.testing.assert_array_equal(np.load(tmp_path / "boxes.npy"), boxes)
    np.testing.assert_array_equal(np.load(tmp_path / "valid.npy"), valid)
    assert store.metadata["num_regions"] == 6 and "layout" not in store.metadata
    assert merge_store(tmp_path) == tmp_path  # already complete: nothing to do
    with pytest.raises(OVDError, match="nothing to merge"):
        merge_store(tmp_path / "empty")
    assert part_path(tmp_path, 1, 2).name == "shard1-chunk2.npz"
