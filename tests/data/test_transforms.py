"""Resize/flip transforms: hand-derived sizes and boxes, round trips, image/box consistency."""

from __future__ import annotations

import numpy as np
import pytest

from ovd.data.transforms import ResizeFlipAugmentation, TransformParams, resize_shortest_edge_size
from ovd.errors import OVDError


@pytest.mark.parametrize(
    ("h", "w", "short", "max_size", "expected"),
    [
        # 800/480 = 1.667; 640 * 1.667 = 1066.67 -> 1067
        (480, 640, 800, 1333, (800, 1067)),
        # portrait: same numbers transposed
        (640, 480, 800, 1333, (1067, 800)),
        # 100x1000: scale 8 would give 8000 > 1333, so scale = 1333/1000 -> (133.3, 1333) -> (133, 1333)
        (100, 1000, 800, 1333, (133, 1333)),
        (500, 500, 800, 1333, (800, 800)),
        (800, 1067, 800, 1333, (800, 1067)),
        # image-labelled data (METHOD §1.5): short 400, max 667; 640 * 400/480 = 533.33 -> 533
        (480, 640, 400, 667, (400, 533)),
        # downscale: 427 * 0.5 = 213.5 rounds half up -> 214
        (200, 427, 100, 1333, (100, 214)),
    ],
)
def test_resize_shortest_edge_size(h: int, w: int, short: int, max_size: int, expected: tuple[int, int]) -> None:
    assert resize_shortest_edge_size(h, w, short, max_size) == expected


def test_resize_shortest_edge_size_rejects_bad_sizes() -> None:
    with pytest.raises(OVDError):
        resize_shortest_edge_size(0, 10, 800, 1333)
    with pytest.raises(OVDError):
        resize_shortest_edge_size(10, 10, 800, 0)


def test_apply_boxes_hand_case_flip_and_clip() -> None:
    # 100x200 (HxW) image resized to 50x100: scale 0.5 on both axes, then flipped (W' = 100).
    p = TransformParams(orig_h=100, orig_w=200, out_h=50, out_w=100, flip=True)
    assert (p.scale_x, p.scale_y) == (0.5, 0.5)
    boxes = np.array(
        [
            [20, 10, 60, 50],  # scaled [10,5,30,25] -> flipped x1'=100-30=70, x2'=100-10=90
            [180, 90, 210, 110],  # proposal outside the image: scaled [90,45,105,55]
            # -> flipped [100-105, 45, 100-90, 55] = [-5,45,10,55] -> clipped [0,45,10,50]
        ],
        dtype=np.float32,
    )
    out = p.apply_boxes(boxes)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[70, 5, 90, 25], [0, 45, 10, 50]])
    # without flip: [10,5,30,25] and [90,45,105,55] clipped to [90,45,100,50]
    q = TransformParams(orig_h=100, orig_w=200, out_h=50, out_w=100, flip=False)
    np.testing.assert_array_equal(q.apply_boxes(boxes), [[10, 5, 30, 25], [90, 45, 100, 50]])


def test_apply_boxes_anisotropic_scale() -> None:
    # 480x640 -> 800x1067: sx = 1067/640 = 1.6671875, sy = 800/480
    p = TransformParams(orig_h=480, orig_w=640, out_h=800, out_w=1067, flip=False)
    out = p.apply_boxes(np.array([[64, 48, 640, 480]], dtype=np.float32))
    np.testing.assert_allclose(out, [[64 * 1067 / 640, 80, 1067, 800]], rtol=1e-6)


def test_apply_boxes_empty_and_bad_shape() -> None:
    p = TransformParams(10, 10, 20, 20, True)
    out = p.apply_boxes(np.zeros((0, 4), dtype=np.float32))
    assert out.shape == (0, 4) and out.dtype == np.float32
    assert p.inverse_boxes(np.zeros((0, 4), dtype=np.float32)).shape == (0, 4)
    with pytest.raises(OVDError, match=r"\[N, 4\]"):
        p.apply_boxes(np.zeros((3, 5), dtype=np.float32))


@pytest.mark.parametrize("flip", [False, True])
def test_inverse_boxes_round_trip(flip: bool) -> None:
    rng = np.random.default_rng(0)
    p = TransformParams(orig_h=375, orig_w=500, out_h=800, out_w=1067, flip=flip)
    xy = rng.uniform(0, 1, size=(50, 2, 2)) * np.array([500, 375])
    boxes = np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1).astype(np.float32)
    back = p.inverse_boxes(p.apply_boxes(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_inverse_boxes_hand_case() -> None:
    p = TransformParams(orig_h=100, orig_w=200, out_h=50, out_w=100, flip=True)
    # [70,5,90,25] unflipped -> [10,5,30,25], /0.5 -> [20,10,60,50]
    np.testing.assert_array_equal(p.inverse_boxes(np.array([[70, 5, 90, 25]])), [[20, 10, 60, 50]])


def _rect_image(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[y1:y2, x1:x2] = (255, 128, 0)
    return img


@pytest.mark.parametrize(
    ("out_hw", "flip"),
    [((100, 150), False), ((100, 150), True), ((30, 45), True), ((61, 90), True), ((60, 90), True)],
)
def test_image_and_box_stay_consistent(out_hw: tuple[int, int], flip: bool) -> None:
    # A filled rectangle covering pixels [20,50) x [10,30) has the xyxy box [20,10,50,30].
    box = (20, 10, 50, 30)
    img = _rect_image(60, 90, box)
    p = TransformParams(orig_h=60, orig_w=90, out_h=out_hw[0], out_w=out_hw[1], flip=flip)
    out = p.apply_image(img)
    assert out.shape == (*out_hw, 3) and out.dtype == np.uint8
    ys, xs = np.nonzero(out[:, :, 0] > 127)
    tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # pixel-edge xyxy of the drawn rectangle
    np.testing.assert_allclose(p.apply_boxes(np.array([box], dtype=np.float32))[0], tight, atol=1.0)


def test_apply_image_flip_is_mirror_of_no_flip() -> None:
    img = np.random.default_rng(0).integers(0, 256, size=(12, 17, 3), dtype=np.uint8)
    a = TransformParams(12, 17, 24, 34, flip=False).apply_image(img)
    b = TransformParams(12, 17, 24, 34, flip=True).apply_image(img)
    np.testing.assert_array_equal(b, a[:, ::-1])
    assert b.flags["C_CONTIGUOUS"]
    # identity size: no resampling
    np.testing.assert_array_equal(TransformParams(12, 17, 12, 17, flip=False).apply_image(img), img)
    with pytest.raises(OVDError, match="12x17"):
        TransformParams(12, 17, 24, 34, flip=False).apply_image(img[:, :5])


def test_augmentation_choice_range_and_flip() -> None:
    rng = np.random.default_rng(0)
    choice = ResizeFlipAugmentation((400, 600, 800), 1333, flip_prob=0.5)
    shorts, flips = set(), []
    for _ in range(200):
        p = choice.sample(480, 640, rng)
        shorts.add(min(p.out_h, p.out_w))
        flips.append(p.flip)
        assert (p.orig_h, p.orig_w) == (480, 640)
        assert (p.out_h, p.out_w) == resize_shortest_edge_size(480, 640, min(p.out_h, p.out_w), 1333)
    assert shorts == {400, 600, 800}
    assert 60 < sum(flips) < 140  # ~Binomial(200, 0.5)

    ranged = ResizeFlipAugmentation([400, 402], 1333, sample_style="range", flip_prob=0.0)
    assert ranged.min_sizes == (400, 402)  # lists are coerced, the dataclass stays hashable
    draws = [ranged.sample(480, 640, rng) for _ in range(100)]
    assert {d.out_h for d in draws} == {400, 401, 402}  # inclusive on both ends
    assert not any(d.flip for d in draws)
    assert all(ResizeFlipAugmentation((800,), 1333, flip_prob=1.0).sample(9, 9, rng).flip for _ in range(10))


def test_augmentation_is_deterministic_given_rng() -> None:
    aug = ResizeFlipAugmentation(tuple(range(128, 1281, 32)), 1333)
    a = [aug.sample(480, 640, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    assert [aug.sample(480, 640, rng1) for _ in range(20)] == [aug.sample(480, 640, rng2) for _ in range(20)]


def test_for_test_is_deterministic() -> None:
    aug = ResizeFlipAugmentation.for_test(800, 1333)
    assert aug == ResizeFlipAugmentation((800,), 1333, flip_prob=0)
    p = aug.sample(480, 640, np.random.default_rng(1))
    assert p == TransformParams(480, 640, 800, 1067, False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_sizes": (), "max_size": 1333},
        {"min_sizes": (0,), "max_size": 1333},
        {"min_sizes": (800,), "max_size": 0},
        {"min_sizes": (400, 500, 600), "max_size": 1333, "sample_style": "range"},
        {"min_sizes": (500, 400), "max_size": 1333, "sample_style": "range"},
        {"min_sizes": (800,), "max_size": 1333, "sample_style": "uniform"},
        {"min_sizes": (800,), "max_size": 1333, "flip_prob": 1.5},
    ],
)
def test_augmentation_validation(kwargs: dict) -> None:
    with pytest.raises(OVDError):
        ResizeFlipAugmentation(**kwargs)
