"""ovd.clip.text: prompt → embedding numbers, the .npy + sidecar cache, and the dump CLI (hermetic)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import ovd.clip.text as text_mod
from ovd.clip import (
    DEFAULT_TEMPLATES,
    ENSEMBLE_TEMPLATES,
    ClipSpec,
    build_text_embeddings,
    create_clip,
    get_or_build_text_embeddings,
    load_text_embeddings,
    save_clip_checkpoint,
    save_text_embeddings,
)
from ovd.errors import OVDError

DATA = Path(__file__).resolve().parents[1] / "data"
REFERENCE_NPY = DATA / "coco_clip_a+photo+cname.npy"
TOOL = Path(__file__).resolve().parents[2] / "tools" / "dump_text_embeddings.py"
NAMES = ("cat", "traffic light", "bat_(animal)")

# COCO 2017 category names sorted by category id: the row order of REFERENCE_NPY (METHOD §2.1).
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random CLIP saved as an ordinary checkpoint, and the bundle loaded from it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    save_clip_checkpoint(create_clip("ovd-tiny"), path)
    return path, create_clip("ovd-tiny", path)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return tiny_ckpt[1]


def _manual(clip, prompts):
    """Reference: open_clip's own tokenizer + encode_text, then L2-normalise."""
    tokens = open_clip.get_tokenizer("ovd-tiny")(prompts)  # (N, 77)
    with torch.no_grad():
        return F.normalize(clip.model.encode_text(tokens), dim=-1)  # (N, D)


def test_default_template_is_reference_prompt():
    assert DEFAULT_TEMPLATES == ("a photo of a {}",)  # METHOD §2.1: no period
    assert all("{}" in t for t in ENSEMBLE_TEMPLATES) and len(ENSEMBLE_TEMPLATES) == 7


def test_embeddings_equal_manual_open_clip(tiny):
    emb = build_text_embeddings(tiny, NAMES)
    expected = _manual(tiny, ["a photo of a cat", "a photo of a traffic light", "a photo of a bat_(animal)"])
    assert emb.dtype == torch.float32 and emb.shape == (3, 64)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-6)
    # the period matters: a different prompt gives a different embedding
    assert not torch.allclose(emb[0], _manual(tiny, ["a photo of a cat."])[0], atol=1e-4)
    # batching does not change the numbers
    torch.testing.assert_close(build_text_embeddings(tiny, NAMES, batch_size=1), emb, rtol=0, atol=1e-5)


def test_template_ensemble_is_normalised_mean(tiny):
    templates = ("a photo of a {}", "art of the {}.")
    emb = build_text_embeddings(tiny, NAMES, templates)  # (3, 64)
    e1 = _manual(tiny, [f"a photo of a {n}" for n in NAMES])  # (3, 64) unit rows
    e2 = _manual(tiny, [f"art of the {n}." for n in NAMES])
    torch.testing.assert_close(emb, F.normalize((e1 + e2) / 2, dim=-1), rtol=0, atol=1e-6)
    # by hand: the normalised mean of two unit vectors bisects them, so it has equal cosine to both,
    # and that cosine is sqrt((1 + e1·e2) / 2)
    c1, c2, c12 = (emb * e1).sum(1), (emb * e2).sum(1), (e1 * e2).sum(1)
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-6)
    torch.testing.assert_close(c1, ((1 + c12) / 2).sqrt(), rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ([], "empty"),
        (["cat", "Dog", " cat ", "dog"], "duplicate class names.*: cat, dog"),
        (["cat", ""], "class name 1 is empty"),
        (["cat", "   "], "class name 1 is empty"),
        (["cat", 3], "not a string"),
        ("cat", "not one string"),
    ],
)
def test_bad_vocabulary(tiny, names, match):
    with pytest.raises(OVDError, match=match):
        build_text_embeddings(tiny, names)


@pytest.mark.parametrize(("templates", "match"), [((), "no prompt templates"), (("a photo",), "placeholder")])
def test_bad_templates(tiny, templates, match):
    with pytest.raises(OVDError, match=match):
        build_text_embeddings(tiny, NAMES, templates)


def _save(path, emb, names=NAMES, **kw):
    kw = {"model_name": "ovd-tiny", "pretrained": "x.pt", "templates": DEFAULT_TEMPLATES, **kw}
    return save_text_embeddings(path, emb, class_names=names, checkpoint_sha256="ab" * 32, **kw)


def test_cache_round_trip(tmp_path):
    emb = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    npy = _save(tmp_path / "voc", emb)
    assert npy == tmp_path / "voc.npy" and (tmp_path / "voc.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc.json", "voc.npy"]  # no temp files left
    assert np.load(npy).dtype == np.float32
    loaded = load_text_embeddings(tmp_path / "voc.npy", expected_dim=8, expected_num=3)
    assert torch.equal(loaded.embeddings, emb)
    assert loaded.class_names == NAMES and loaded.path == npy
    meta = loaded.metadata
    assert meta["model_name"] == "ovd-tiny" and meta["pretrained"] == "x.pt"
    assert meta["checkpoint_sha256"] == "ab" * 32 and meta["templates"] == ["a photo of a {}"]
    assert (meta["num_classes"], meta["dim"], meta["dtype"]) == (3, 8, "float32")
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None
    # float16 on disk: values round to the nearest half, loaded back as float32
    _save(tmp_path / "half.npy", emb, dtype="float16")
    half = load_text_embeddings(tmp_path / "half")
    assert np.load(tmp_path / "half.npy").dtype == np.float16 and half.embeddings.dtype == torch.float32
    assert torch.equal(half.embeddings, emb.half().float())


def test_save_checks_rows_against_names(tmp_path):
    with pytest.raises(OVDError, match="do not match 2 class names"):
        _save(tmp_path / "v", torch.ones(3, 8), names=("a", "b"))


def test_reference_npy_loads(tmp_path):
    ref = load_text_embeddings(REFERENCE_NPY, expected_dim=512, expected_num=80)
    assert ref.embeddings.shape == (80, 512) and ref.embeddings.dtype == torch.float32
    assert ref.class_names is None and ref.metadata == {}
    # float16 on disk, loaded exactly as float32
    assert torch.equal(ref.embeddings, torch.from_numpy(np.load(REFERENCE_NPY)).float())
    norms = ref.embeddings.norm(dim=1)
    assert ((norms > 8) & (norms < 12)).all()  # unnormalised CLIP ViT-B/32 rows (measured 8.4–11.3)
    torch.testing.assert_close(F.normalize(ref.embeddings, dim=-1).norm(dim=1), torch.ones(80))
    with pytest.raises(OVDError, match=r"coco_clip_a\+photo\+cname\.npy.*dim is 512 but 64 was expected"):
        load_text_embeddings(REFERENCE_NPY, expected_dim=64)
    with pytest.raises(OVDError, match="80 class embeddings but 65 classes"):
        load_text_embeddings(REFERENCE_NPY, expected_num=65)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.ones(8, np.float32), "2-D"),
        (np.ones((2, 3, 4), np.float32), "2-D"),
        (np.ones((2, 4), np.int64), "float array"),
        (np.zeros((0, 4), np.float32), "no rows"),
        (np.array([[1, 1], [np.nan, 1], [1, 1], [1, np.inf]], np.float32), "rows 1, 3 contain NaN or inf"),
        (np.array([[1, 1], [0, 0]], np.float32), "rows 1 are all zero"),
    ],
)
def test_load_rejects_bad_arrays(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(OVDError, match=match):
        load_text_embeddings(tmp_path / "bad.npy")


def test_load_errors_missing_pickled_and_sidecar(tmp_path):
    with pytest.raises(OVDError, match="not found"):
        load_text_embeddings(tmp_path / "missing.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(OVDError, match="not a readable .npy"):
        load_text_embeddings(tmp_path / "obj.npy")
    npy = _save(tmp_path / "v", torch.ones(3, 8))
    sidecar = npy.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "class_names": ["a", "b"]}))
    with pytest.raises(OVDError, match="2 class names but the array has 3 rows"):
        load_text_embeddings(npy)


def _count_builds(monkeypatch):
    calls = {"build": 0, "create": 0}
    build, create = text_mod.build_text_embeddings, text_mod.create_clip

    def counting_build(*a, **k):
        calls["build"] += 1
        return build(*a, **k)

    def counting_create(*a, **k):
        calls["create"] += 1
        return create(*a, **k)

    monkeypatch.setattr(text_mod, "build_text_embeddings", counting_build)
    monkeypatch.setattr(text_mod, "create_clip", counting_create)
    return calls


def test_get_or_build_reuses_and_invalidates(tmp_path, tiny_ckpt, monkeypatch):
    ckpt, bundle = tiny_ckpt
    calls = _count_builds(monkeypatch)
    cache = tmp_path / "cache" / "voc"
    spec = ClipSpec("ovd-tiny", str(ckpt))
    first = get_or_build_text_embeddings(cache, spec, NAMES)
    assert calls == {"build": 1, "create": 1}
    torch.testing.assert_close(first.embeddings, build_text_embeddings(bundle, NAMES), rtol=0, atol=1e-6)
    assert first.metadata["checkpoint_sha256"] == bundle.checkpoint_sha256
    # same request: read from the cache, the model is not even built
    again = get_or_build_text_embeddings(cache, spec, NAMES)
    assert calls == {"build": 1, "create": 1} and torch.equal(again.embeddings, first.embeddings)
    # the checkpoint moved: same hash, still a hit; a built bundle is also accepted
    moved = tmp_path / "moved.pt"
    shutil.copy(ckpt, moved)
    get_or_build_text_embeddings(cache, ClipSpec("ovd-tiny", str(moved)), NAMES)
    get_or_build_text_embeddings(cache, bundle, NAMES)
    assert calls["build"] == 1
    # any changed input rebuilds: names, their order, templates, dtype
    changed = get_or_build_text_embeddings(cache, spec, (*NAMES, "dog"))
    assert calls["build"] == 2 and changed.class_names == (*NAMES, "dog")
    get_or_build_text_embeddings(cache, spec, NAMES[::-1])
    get_or_build_text_embeddings(cache, spec, NAMES[::-1], ("art of the {}.",))
    assert calls["build"] == 4
    halved = get_or_build_text_embeddings(cache, bundle, NAMES[::-1], ("art of the {}.",), dtype="float16")
    assert calls["build"] == 5 and halved.metadata["dtype"] == "float16"
    # other weights (a retrained checkpoint) rebuild
    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    save_clip_checkpoint(create_clip("ovd-tiny"), other)
    get_or_build_text_embeddings(cache, ClipSpec("ovd-tiny", str(other)), NAMES[::-1], ("art of the {}.",))
    assert calls["build"] == 6


def test_get_or_build_never_trusts_random_init_or_bare_npy(tmp_path, tiny_ckpt, monkeypatch):
    calls = _count_builds(monkeypatch)
    cache = tmp_path / "voc.npy"
    get_or_build_text_embeddings(cache, ClipSpec("ovd-tiny"), NAMES)
    get_or_build_text_embeddings(cache, ClipSpec("ovd-tiny"), NAMES)
    assert calls["build"] == 2  # random weights differ on every build: never reused
    spec = ClipSpec("ovd-tiny", str(tiny_ckpt[0]))
    get_or_build_text_embeddings(cache, spec, NAMES)
    assert calls["build"] == 3
    cache.with_suffix(".json").unlink()  # an array without sidecar (e.g. an interrupted write)
    rebuilt = get_or_build_text_embeddings(cache, spec, NAMES)
    assert calls["build"] == 4 and rebuilt.class_names == NAMES
    with pytest.raises(OVDError, match="neither an open_clip pretrained tag"):  # resolved before building
        get_or_build_text_embeddings(cache, ClipSpec("ovd-tiny", "openai"), NAMES)
    assert calls["create"] == 4


def _load_tool():
    spec = importlib.util.spec_from_file_location("dump_text_embeddings", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_comma_list_and_file(tmp_path):
    tool = _load_tool()
    out = tmp_path / "voc"
    assert (
        tool.main(["--model", "ovd-tiny", "--vocabulary", "cat, traffic light,bat_(animal)", "--output", str(out)]) == 0
    )
    loaded = load_text_embeddings(out, expected_dim=64)
    assert loaded.class_names == NAMES and loaded.metadata["templates"] == ["a photo of a {}"]
    torch.testing.assert_close(loaded.embeddings.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    names_file = tmp_path / "names.txt"
    names_file.write_text("cat\n\ndog \n")
    argv = ["--model", "ovd-tiny", "--vocabulary", str(names_file), "--templates", "ensemble"]
    assert tool.main([*argv, "--output", str(tmp_path / "f"), "--dtype", "float16"]) == 0
    loaded = load_text_embeddings(tmp_path / "f.npy")
    assert loaded.class_names == ("cat", "dog") and loaded.metadata["templates"] == list(ENSEMBLE_TEMPLATES)
    assert loaded.metadata["dtype"] == "float16"


def test_cli_dataset_name_and_errors(tmp_path, monkeypatch, capsys):
    tool = _load_tool()

    def fake_get_dataset(name, prepare=True):
        if name == "toy":
            return SimpleNamespace(class_names=("circle", "square"))
        raise OVDError(f"unknown dataset {name!r}")

    monkeypatch.setattr(tool, "get_dataset", fake_get_dataset)
    assert tool.main(["--model", "ovd-tiny", "--vocabulary", "toy", "--output", str(tmp_path / "t")]) == 0
    assert load_text_embeddings(tmp_path / "t").class_names == ("circle", "square")
    capsys.readouterr()
    for argv, match in [
        (["--model", "ovd-tiny", "--vocabulary", "nope"], "unknown dataset 'nope'"),
        (["--model", "ovd-tiny", "--vocabulary", "cat,Cat"], "duplicate class names"),
        (["--model", "ovd-tiny", "--vocabulary", "missing.txt"], "vocabulary file not found"),
        (["--model", "ovd-tiny", "--pretrained", str(tmp_path / "no.pt"), "--vocabulary", "a,"], "not found"),
        (["--model", "ViT-B-33", "--vocabulary", "a,"], "did you mean 'ViT-B-32'"),
    ]:
        assert tool.main([*argv, "--output", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "e.npy").exists()


@pytest.mark.weights
def test_weights_tests_read_the_real_model_cache(tmp_path):
    import huggingface_hub.constants as hf_constants

    assert not hf_constants.HF_HUB_CACHE.startswith(str(tmp_path))  # the configured cache, not an empty one
    assert hf_constants.HF_HUB_OFFLINE  # still no downloads


@pytest.mark.weights
def test_vitb32_openai_matches_reference_npy():
    """With OpenAI ViT-B/32 weights in the local cache, our embeddings reproduce the reference file."""
    try:
        clip = create_clip("ViT-B-32", "openai")
    except OVDError as e:
        pytest.skip(f"ViT-B-32 openai weights not available locally: {e.reason[:80]}")
    ours = build_text_embeddings(clip, COCO_NAMES)  # (80, 512), unit rows
    ref = F.normalize(load_text_embeddings(REFERENCE_NPY).embeddings, dim=-1)  # (80, 512)
    cos = (ours * ref).sum(1)  # (80,)
    assert cos.min() > 0.99, cos.min()
