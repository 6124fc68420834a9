"""ovd.clip.teacher: OV-Shapes CLIP teacher training, its checkpoint + sidecar, zero-shot accuracy (hermetic)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

import ovd.clip.teacher as teacher
import ovd.clip.teacher_data as teacher_data
from ovd.clip import ClipBundle, create_clip, file_sha256
from ovd.clip.teacher import (
    TeacherConfig,
    contrastive_loss,
    crops_to_tensor,
    ensure_teacher,
    learning_rate,
    render_teacher_crops,
    teacher_path,
    zero_shot_accuracy,
)
from ovd.data.ovshapes import CLASS_NAMES, DEFAULT_NOVEL
from ovd.errors import OVDError

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_ovshapes_teacher.py"

# 16 training crops = one batch seen every step, no augmentation: the loss must go down quickly.
TINY = TeacherConfig(
    num_train_crops=16,
    num_eval_crops=16,
    steps=20,
    batch_size=16,
    lr=2e-3,
    warmup_steps=2,
    hflip_prob=0.0,
    scale_jitter=0.0,
    shift_jitter=0.0,
    brightness_jitter=0.0,
    contrast_jitter=0.0,
)


def _offline(mp: pytest.MonkeyPatch, root: Path) -> None:
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("OVD_DATASETS", str(root))
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    mp.setattr(hf_constants, "HF_HUB_CACHE", str(root / "hf_cache"))


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path):
    """No downloads, datasets under tmp_path, one torch thread (tiny ops on a shared 2-core machine)."""
    _offline(monkeypatch, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run through ensure_teacher; keeps the in-memory model that was saved."""
    root = tmp_path_factory.mktemp("datasets")
    saved: dict[str, nn.Module] = {}
    original_save = teacher.save_clip_checkpoint

    def spy(model, path):
        saved["model"] = model
        return original_save(model, path)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, root)
        mp.setattr(teacher, "save_clip_checkpoint", spy)
        path = ensure_teacher(root, TINY)
    torch.set_num_threads(threads)
    return root, path, saved["model"], teacher.read_json(path.with_suffix(".json"))


def test_training_lowers_the_loss(trained):
    losses = trained[3]["losses"]
    assert len(losses) == TINY.steps and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1


def test_checkpoint_round_trips_through_create_clip(trained):
    root, path, model, _ = trained
    assert path == root / "ovshapes" / "teacher" / "ovshapes-clip.pt"
    loaded = create_clip("ovd-tiny-cnn", pretrained=path)  # the ordinary open_clip path, nothing special
    assert loaded.checkpoint_sha256 == file_sha256(path)
    images, _, captions = render_teacher_crops(TINY, "eval")
    x = crops_to_tensor(images[:4], loaded)  # (4, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ovd-tiny-cnn")(captions[:4])  # (4, 16)
    model.eval()
    with torch.no_grad():
        expected_img, expected_txt = model.encode_image(x), model.encode_text(tokens)
    torch.testing.assert_close(loaded.encode_images(x), expected_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.encode_text(captions[:4]), expected_txt, rtol=0, atol=1e-6)


def test_sidecar_records_config_accuracy_and_hash(trained):
    _, path, _, record = trained
    assert record["format"] == teacher.FORMAT_NAME and record["format_version"] == teacher.FORMAT_VERSION
    assert record["config"] == TINY.to_json()
    assert record["checkpoint_sha256"] == file_sha256(path)
    assert record["class_names"] == list(CLASS_NAMES)
    assert record["novel_classes"] == list(DEFAULT_NOVEL)
    acc = record["accuracy"]
    assert set(acc) >= {"top1", "top1_base", "top1_novel", "num", "num_base", "num_novel", "per_class"}
    assert acc["num"] == TINY.num_eval_crops == acc["num_base"] + acc["num_novel"]
    assert all(0 <= acc[k] <= 100 for k in ("top1", "top1_base", "top1_novel"))


def test_ensure_teacher_reuses_and_retrains(trained, monkeypatch):
    root, path, _, _ = trained
    before = (path.stat().st_mtime_ns, file_sha256(path))
    calls = []
    monkeypatch.setattr(teacher, "train_teacher", lambda cfg, out, **kw: calls.append((cfg, out)))
    assert ensure_teacher(root, TINY) == path
    assert calls == [] and (path.stat().st_mtime_ns, file_sha256(path)) == before
    assert ensure_teacher(None, TINY) == teacher_path() != path  # OVD_DATASETS (tmp_path) is the default root
    assert len(calls) == 1  # nothing there yet
    other = dataclasses.replace(TINY, steps=21)
    ensure_teacher(root, other)
    assert calls[-1] == (other, path)  # config differs


def test_ensure_teacher_retrains_a_replaced_checkpoint(trained, tmp_path, monkeypatch):
    _, path, _, _ = trained
    copy = teacher_path(tmp_path)
    copy.parent.mkdir(parents=True)
    copy.with_suffix(".json").write_bytes(path.with_suffix(".json").read_bytes())
    copy.write_bytes(path.read_bytes()[:-1] + b"x")  # sidecar hash no longer matches
    calls = []
    monkeypatch.setattr(teacher, "train_teacher", lambda cfg, out, **kw: calls.append(out))
    ensure_teacher(tmp_path, TINY)
    assert calls == [copy]


# ----------------------------------------------------------------------------------------------
# zero_shot_accuracy on a hand-made bundle


class _OneHotClip(nn.Module):
    """Image of class k: red channel = 40·k; text of class k: token k. Both embed to one-hot(k)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the bundle a device

    def encode_image(self, x, normalize=False):
        k = torch.round(x[:, 0, 0, 0] * 255 / 40).long()  # (B,)
        return F.one_hot(k, self.num_classes).float()

    def encode_text(self, tokens, normalize=False):
        return F.one_hot(tokens[:, 0], self.num_classes).float()


def test_zero_shot_accuracy_hand_made():
    names = ("cat", "dog", "bird")
    bundle = ClipBundle(
        model=_OneHotClip(3),
        tokenizer=lambda texts: torch.tensor([[names.index(t.removeprefix("a photo of a "))] for t in texts]),
        preprocess=transforms.ToTensor(),
        model_name="one-hot",
        pretrained=None,
        embed_dim=3,
        image_size=(2, 2),
    )
    truth = [0, 0, 1, 1, 2, 2]
    shown = [0, 1, 1, 1, 2, 0]  # the class each image looks like: images 1 and 5 are wrong
    images = np.zeros((6, 2, 2, 3), dtype=np.uint8)
    images[..., 0] = np.array(shown)[:, None, None] * 40
    acc = zero_shot_accuracy(bundle, images, truth, names, novel_ids=[2])
    # all: 4 of 6 right; base (cat, dog: images 0-3): 3 of 4; novel (bird: images 4, 5): 1 of 2
    assert acc["top1"] == pytest.approx(100 * 4 / 6, abs=0.01)
    assert acc["top1_base"] == 75.0 and acc["top1_novel"] == 50.0
    assert (acc["num"], acc["num_base"], acc["num_novel"]) == (6, 4, 2)
    assert acc["per_class"] == {"cat": 50.0, "dog": 100.0, "bird": 50.0}
    none_novel = zero_shot_accuracy(bundle, images[:4], truth[:4], names, novel_ids=[2])
    assert none_novel["top1_novel"] is None and none_novel["num_novel"] == 0
    with pytest.raises(OVDError, match="class ids"):
        zero_shot_accuracy(bundle, images, [0, 1, 2, 3, 0, 0], names, novel_ids=[2])


def test_crops_to_tensor_equals_open_clip_preprocess():
    clip = create_clip("ovd-tiny-cnn")
    images, _, _ = render_teacher_crops(dataclasses.replace(TINY, num_eval_crops=3), "eval")
    expected = torch.stack([clip.preprocess(Image.fromarray(im)) for im in images])  # (3, 3, 32, 32)
    torch.testing.assert_close(crops_to_tensor(images, clip), expected, rtol=0, atol=1e-6)
    with pytest.raises(OVDError, match="expected crops"):
        crops_to_tensor(images[:, :16], clip)


# ----------------------------------------------------------------------------------------------
# Pieces


def test_train_and_eval_crops_differ_and_ignore_workers(monkeypatch):
    monkeypatch.setattr(teacher_data, "_CHUNK_CROPS", 4)
    cfg = dataclasses.replace(TINY, num_train_crops=10, num_eval_crops=10)
    train, train_labels, train_caps = render_teacher_crops(cfg, "train", workers=1)
    again, again_labels, again_caps = render_teacher_crops(cfg, "train", workers=2)
    np.testing.assert_array_equal(train, again)
    np.testing.assert_array_equal(train_labels, again_labels)
    assert train.shape == (10, 32, 32, 3) and train_caps == again_caps
    held_out, _, _ = render_teacher_crops(cfg, "eval")
    assert not any((a == b).all() for a in train for b in held_out)


def test_contrastive_loss_matches_open_clip_and_a_loop():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)  # (B, D)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    ids = torch.arange(5)
    expected = open_clip.ClipLoss()(img, txt, scale)  # identity targets: CLIP's loss exactly
    torch.testing.assert_close(contrastive_loss(img, txt, scale, ids, ids), expected)

    img_labels, txt = torch.tensor([0, 1, 0, 2, 1]), txt[:3]
    txt_labels = torch.tensor([1, 0, 2])
    logits = scale * img @ txt.T  # (5, 3)
    i2t = [-logits[i].log_softmax(0)[txt_labels == img_labels[i]].mean() for i in range(5)]
    t2i = [-logits[:, j].log_softmax(0)[img_labels == txt_labels[j]].mean() for j in range(3)]
    loop = (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, img_labels, txt_labels), loop)
    perm = torch.tensor([2, 0, 1])  # permuting the texts changes nothing
    torch.testing.assert_close(
        contrastive_loss(img, txt[perm], scale, img_labels, txt_labels[perm]), loop, rtol=1e-6, atol=1e-6
    )

    # a class prompt whose class has no image in the batch: a negative of every image, no t2i term
    extra = F.normalize(torch.randn(1, 8, generator=g), dim=-1)
    txt4, labels4 = torch.cat([txt, extra]), torch.cat([txt_labels, torch.tensor([7])])
    logits4 = scale * img @ txt4.T  # (5, 4)
    i2t4 = [-logits4[i].log_softmax(0)[labels4 == img_labels[i]].mean() for i in range(5)]
    loop4 = (torch.stack(i2t4).mean() + torch.stack(t2i).mean()) / 2
    torch.testing.assert_close(contrastive_loss(img, txt4, scale, img_labels, labels4), loop4)


def test_learning_rate_schedule():
    cfg = dataclasses.replace(TINY, steps=11, warmup_steps=2, lr=1.0, min_lr=0.1)
    assert learning_rate(0, cfg) == 0.5 and learning_rate(1, cfg) == 1.0  # linear warm-up
    assert learning_rate(2, cfg) == pytest.approx(1.0)  # cosine starts at the peak ...
    assert learning_rate(6, cfg) == pytest.approx(0.55)  # ... is half-way at the middle ...
    assert learning_rate(10, cfg) == pytest.approx(0.1)  # ... and ends at min_lr


@pytest.mark.parametrize(
    "change", [{"steps": 0}, {"batch_size": 1}, {"lr": 0.0}, {"hflip_prob": 1.5}, {"novel_classes": ("cat",)}]
)
def test_config_rejects_bad_values(change):
    with pytest.raises(OVDError, match="invalid teacher config"):
        dataclasses.replace(TINY, **change)


def test_cli_reports_bad_input(capsys):
    spec = importlib.util.spec_from_file_location("train_ovshapes_teacher", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    threads = torch.get_num_threads()
    try:
        assert tool.main(["--steps", "0", "--threads", "1"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().err.startswith("error: ")
