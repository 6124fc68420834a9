"""ovd.clip.model: building the tiny open_clip model, weights resolution, checkpoints (hermetic, CPU)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from PIL import Image

from ovd.clip import ClipSpec, create_clip, file_sha256, save_clip_checkpoint
from ovd.errors import OVDError

TEXTS = ["a photo of a cat", "a photo of a traffic light", "a photo of a bat_(animal)"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_clip("ovd-tiny")


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g)  # (B, 3, H, W)


def test_tiny_model_builds_offline(tiny):
    assert tiny.model_name == "ovd-tiny"
    assert tiny.pretrained is None and tiny.checkpoint_sha256 is None
    assert tiny.embed_dim == 64 and tiny.image_size == (64, 64)
    assert not tiny.model.training
    # trainable as a CLIP: parameters keep requires_grad and the contrastive forward works
    assert all(p.requires_grad for p in tiny.model.parameters())
    assert tiny.spec == ClipSpec("ovd-tiny", None, None)


def test_encode_text_equals_open_clip(tiny):
    tokens = open_clip.get_tokenizer("ovd-tiny")(TEXTS)  # (3, 77)
    with torch.no_grad():
        expected = tiny.model.encode_text(tokens)  # (3, 64)
    out = tiny.encode_text(TEXTS)
    assert out.dtype == torch.float32 and out.shape == (3, 64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # not normalised: a random-init text tower does not give unit-norm rows
    assert not torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-3)
    # batching does not change the numbers
    torch.testing.assert_close(tiny.encode_text(TEXTS, batch_size=1), out, rtol=0, atol=1e-5)
    assert tiny.encode_text([]).shape == (0, 64)


def test_encode_images_equals_open_clip_and_is_per_image(tiny):
    images = _images(3)
    with torch.no_grad():
        expected = tiny.model.encode_image(images)  # (3, 64)
    out = tiny.encode_images(images)
    assert out.dtype == torch.float32 and out.shape == (3, 64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # an image's embedding does not depend on the rest of the batch
    torch.testing.assert_close(tiny.encode_images(images[1:2]), out[1:2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        tiny.encode_images(torch.zeros(1, 3, 32, 32))


def test_preprocess_is_clip_eval_transform(tiny):
    x = tiny.preprocess(Image.new("RGB", (100, 80), (255, 0, 0)))  # short side 80 → 64, centre crop
    assert x.shape == (3, 64, 64)
    # pure red, CLIP mean/std (METHOD §3.2): (1 - 0.48145466) / 0.26862954 on the R channel
    torch.testing.assert_close(x[0], torch.full((64, 64), (1 - 0.48145466) / 0.26862954), rtol=0, atol=1e-4)
    torch.testing.assert_close(x[1], torch.full((64, 64), -0.4578275 / 0.26130258), rtol=0, atol=1e-4)


def test_encode_restores_train_mode(tiny):
    tiny.model.train()
    try:
        tiny.encode_text(TEXTS[:1])
        tiny.encode_images(_images(1))
        assert tiny.model.training
    finally:
        tiny.model.eval()


def test_spec_canonical_names():
    assert ClipSpec.resolve("ViT-B/32").model_name == "ViT-B-32"
    spec = ClipSpec.resolve("ViT-B/32", "OpenAI")
    assert spec == ClipSpec("ViT-B-32", "openai", None)


def test_unknown_model_lists_close_matches():
    with pytest.raises(OVDError, match="ViT-B-32") as e:
        create_clip("ViT-B-33")
    assert "unknown open_clip model" in str(e.value)


def test_unknown_tag_for_model():
    with pytest.raises(OVDError, match="neither an open_clip pretrained tag"):
        create_clip("ovd-tiny", "openai")


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(OVDError, match="not found") as e:
        create_clip("ovd-tiny", path)
    assert e.value.path == str(path)


def test_tag_weights_not_available_offline():
    """The real open_clip download path fails offline; the user sees one OVDError line."""
    with pytest.raises(OVDError, match="not available locally") as e:
        create_clip("ViT-B-32", "openai")
    assert "\n" not in str(e.value) and "--pretrained PATH" in str(e.value)


def test_openai_tag_switches_on_quick_gelu(monkeypatch):
    seen = {}

    def fake_create(model_name, **kwargs):
        seen.update(kwargs, model_name=model_name)
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(OVDError):
        create_clip("ViT-B/32", "openai")
    assert seen["model_name"] == "ViT-B-32" and seen["pretrained"] == "openai"
    assert seen["force_quick_gelu"] is True


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    a = create_clip("ovd-tiny")
    path = tmp_path / f"teacher{suffix}"
    sha = save_clip_checkpoint(a, path)
    b = create_clip("ovd-tiny", pretrained=path)
    assert b.checkpoint_sha256 == sha == file_sha256(path)
    assert b.pretrained == str(path)
    assert torch.equal(b.encode_text(TEXTS), a.encode_text(TEXTS))
    assert torch.equal(b.encode_images(_images(2)), a.encode_images(_images(2)))
    torch.manual_seed(2)
    c = create_clip("ovd-tiny")  # control: other random weights give other numbers
    assert not torch.allclose(c.encode_text(TEXTS), a.encode_text(TEXTS))


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    with pytest.raises(OVDError, match="not a readable open_clip state dict") as e:
        create_clip("ovd-tiny", path)
    assert e.value.path == str(path)


def test_checkpoint_of_other_architecture(tmp_path, tiny):
    state = dict(tiny.model.state_dict())
    state["text_projection"] = torch.zeros(64, 32)  # an embed_dim-32 model's projection
    del state["logit_scale"]
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(OVDError, match="do not fit the ovd-tiny architecture") as e:
        create_clip("ovd-tiny", path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600
    assert "size mismatch for text_projection" in msg and "logit_scale" in msg


def test_checkpoint_suffix_checked(tmp_path, tiny):
    with pytest.raises(OVDError, match="must end in"):
        save_clip_checkpoint(tiny.model, tmp_path / "teacher.ckpt")
