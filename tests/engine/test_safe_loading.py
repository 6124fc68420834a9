"""No file ovd reads runs code: a ``__reduce__`` payload that would create a marker file is refused by
every entry point that takes a checkpoint or a pseudo-box pickle, and the marker never appears; a
checkpoint of the previous format loads and predicts the boxes the old (unsafe) loader gave."""

import builtins
import json
import pickle
from importlib import util
from pathlib import Path

import numpy as np
import pytest
import torch

from ovd.config import load_config
from ovd.engine.checkpoint import load_checkpoint, save_checkpoint
from ovd.errors import OVDError
from ovd.predictor import Predictor
from ovd.runtime import checkpoint as ckpt_module
from ovd.utils.cli import run_cli

REPO = Path(__file__).parents[2]
pytestmark = pytest.mark.usefixtures("shared_datasets")


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _tool(name: str):
    spec = util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def evil(tmp_path, tiny_checkpoint):
    """A real checkpoint of the tiny model with one extra entry whose unpickling creates ``marker``."""
    marker = tmp_path / "MARKER"
    state = torch.load(tiny_checkpoint[0], weights_only=True)
    state["extra"] = Payload(marker)
    path = tmp_path / "evil" / "model_0000002.pth"
    path.parent.mkdir()
    torch.save(state, path)
    (path.parent / "last_checkpoint").write_text(path.name)
    # the payload is live: the old loader would have run it
    torch.load(path, weights_only=False)
    assert marker.is_file()
    marker.unlink()
    return path, marker


def _refused(e: BaseException | str, path: Path) -> None:
    text = str(e)
    assert str(path) in text and "refused" in text and "upgrade_checkpoint.py --trust" in text, text


def test_library_entry_points_refuse_a_payload(evil, tiny_checkpoint):
    from ovd.distill.proposals import build_proposal_source

    path, marker = evil
    for load in (load_checkpoint, lambda p: Predictor(p, device="cpu"), build_proposal_source):
        with pytest.raises(OVDError) as e:
            load(path)
        _refused(e.value, path)
    assert not marker.exists()


def test_training_entry_points_refuse_a_payload(evil, tiny_checkpoint, tmp_path):
    from ovd.engine.trainer import evaluate_checkpoint, train

    def _cfg(*extra):  # the tiny checkpoint's own resolved config
        return load_config(tiny_checkpoint[0].parent / "config.yaml", list(extra))

    path, marker = evil
    with pytest.raises(OVDError) as e:  # init_weights
        train(_cfg(f"init_weights={path}"), tmp_path / "init")
    _refused(e.value, path)
    with pytest.raises(OVDError) as e:  # --resume (the folder's last_checkpoint names the payload)
        train(_cfg(), path.parent, resume=True)
    _refused(e.value, path)
    with pytest.raises(OVDError) as e:  # --eval-only --weights
        evaluate_checkpoint(_cfg("data.test=ovshapes_small_val"), str(path), tmp_path / "eval")
    _refused(e.value, path)
    assert not marker.exists()


def test_tools_refuse_a_payload(evil, tiny_checkpoint, tmp_path, capsys):
    path, marker = evil
    image = str(tiny_checkpoint[1][0])
    cfg = str(REPO / "configs/ovshapes/base.yaml")
    calls = [
        ("demo", ["--checkpoint", str(path), "--input", image, "--output", str(tmp_path / "d")]),
        ("export_onnx", ["--checkpoint", str(path), "--output", str(tmp_path / "m.onnx")]),
        ("train_net", ["--config-file", cfg, "--eval-only", "--weights", str(path), "--output-dir",
                       str(tmp_path / "e"), "data.test=ovshapes_small_val", "clip.pretrained="]),
    ]  # fmt: skip
    for name, argv in calls:
        assert run_cli(_tool(name).main, argv) == 2, name
        _refused(capsys.readouterr().err, path)
    assert not marker.exists()


def test_pseudo_box_pickles_admit_plain_data_only(tmp_path, capsys):
    from ovd.data.catalog import get_dataset
    from ovd.data.coco import load_dataset
    from ovd.pis.pseudo_labels import FileBoxes

    info = get_dataset("ovshapes_small_captions")
    records = load_dataset(info)[:2]
    folder = tmp_path / "boxes"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    cid = info.category_ids[int(records[0].pos_labels[0])]
    good = {cid: ([np.array([1.0, 2.0, 30.0, 40.0], dtype=np.float32)], [np.float64(0.99)]), "salient": [1, 2]}
    with open(folder / f"{Path(records[0].file_name).stem}.pkl", "wb") as f:
        pickle.dump(good, f)
    evil = folder / f"{Path(records[1].file_name).stem}.pkl"
    with open(evil, "wb") as f:
        pickle.dump({cid: ([[1, 2, 3, 4]], [Payload(marker)])}, f)
    boxes = FileBoxes(folder, info.category_ids, threshold=0.5)
    label = int(records[0].pos_labels[0])
    np.testing.assert_array_equal(boxes(records[0])[label][0], [1, 2, 30, 40])  # numpy arrays and scalars pass
    with pytest.raises(OVDError, match=r"refused pickle: (io|builtins)\.open is not") as e:
        boxes(records[1])
    assert str(evil) in str(e.value)
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({"images": [{"id": 1, "file_name": Path(records[1].file_name).name,
                                            "pos_category_ids": [cid], "height": 64, "width": 64}],
                                "categories": [{"id": cid, "name": "x"}]}))  # fmt: skip
    argv = ["--tags", str(tags), "--image-root", str(Path(records[1].file_name).parent), "--source", "file",
            "--boxes", str(folder), "--output", str(tmp_path / "p.json"), "--no-progress"]  # fmt: skip
    assert run_cli(_tool("generate_pseudo_labels").main, argv) == 2
    assert str(evil) in capsys.readouterr().err
    half = folder / "half.pkl"
    half.write_bytes(pickle.dumps(good)[:20])
    with pytest.raises(OVDError, match="truncated or corrupt"):
        from ovd.utils.io import load_plain_pickle

        load_plain_pickle(half)
    assert not marker.exists()


def test_previous_format_loads_and_predicts_the_same_boxes(tiny_checkpoint, monkeypatch):
    path, images = tiny_checkpoint
    safe = Predictor(path, confidence=0.0, device="cpu")
    with monkeypatch.context() as m:  # the loader of earlier versions: full unpickling
        m.setattr(
            ckpt_module.torch, "load", lambda *a, **k: torch.serialization.load(*a, **(k | {"weights_only": False}))
        )
        old = Predictor(path, confidence=0.0, device="cpu")
    for image in images[:2]:
        a, b = safe(image), old(image)
        assert len(a.boxes) > 0
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_a_trusted_legacy_checkpoint_is_upgraded_once(tiny_checkpoint, tmp_path, capsys):
    path, images = tiny_checkpoint
    state = torch.load(path, weights_only=True)
    legacy = dict(state, iteration=np.int64(1))
    legacy["vocabulary"] = dict(state["vocabulary"], embeddings=state["vocabulary"]["embeddings"].numpy())
    old = tmp_path / "old.pth"
    torch.save(legacy, old)
    with pytest.raises(OVDError) as e:
        load_checkpoint(old)
    _refused(e.value, old)
    tool = _tool("upgrade_checkpoint")
    with pytest.raises(SystemExit):  # without --trust: refused
        tool.main([str(old), str(tmp_path / "new.pth")])
    assert run_cli(tool.main, ["--trust", str(old), str(tmp_path / "new.pth")]) == 0
    assert "converted" in capsys.readouterr().out
    new = load_checkpoint(tmp_path / "new.pth")
    assert new["iteration"] == 1 and isinstance(new["vocabulary"]["embeddings"], torch.Tensor)
    a = Predictor(path, confidence=0.0, device="cpu")(images[0])
    b = Predictor(tmp_path / "new.pth", confidence=0.0, device="cpu")(images[0])
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_the_upgrade_tool_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "bad.pth"
    torch.save({"model": {}, "extra": Payload(marker)}, bad)
    tool = _tool("upgrade_checkpoint")
    assert run_cli(tool.main, ["--trust", str(bad), str(tmp_path / "new.pth")]) == 2
    assert not marker.exists() and not (tmp_path / "new.pth").exists()


def test_save_refuses_non_plain_state_and_files_follow_the_umask(tmp_path):
    with pytest.raises(OVDError, match=r"only tensors.*\.extra: .*Payload"):
        save_checkpoint(tmp_path / "model_final.pth", {"model": {}, "extra": Payload(tmp_path / "m")})
    assert not (tmp_path / "model_final.pth").exists() and not (tmp_path / "m").exists()
    import os

    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "model_final.pth", {"model": {"w": torch.ones(2)}, "iteration": 3})
    finally:
        os.umask(old)
    assert (tmp_path / "model_final.pth").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "last_checkpoint").stat().st_mode & 0o777 == 0o640
