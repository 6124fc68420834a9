"""``ovd`` exports its public API lazily: ``import ovd`` stays cheap, every exported name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ovd

HEAVY = ("torch", "torchvision", "onnxruntime", "open_clip", "cv2", "ovd.predictor", "ovd.export")


def test_import_ovd_imports_nothing_heavy() -> None:
    code = f"import sys, ovd; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ovd.__all__)
def test_every_export_resolves_to_its_module(name: str) -> None:
    value = getattr(ovd, name)
    assert value.__name__ == name and value.__module__ == ovd._EXPORTS[name]


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Predicter'"):
        ovd.Predicter  # noqa: B018
    assert "Predictor" in dir(ovd)
