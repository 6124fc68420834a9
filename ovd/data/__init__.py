"""Datasets: the catalog, loaders of COCO / LVIS / image-label files, and the synthetic worlds.

Imports run one way: :mod:`ovd.data.catalog` (the registry) imports none of its entries; this package
adds the built-in datasets' registration hook (:func:`ovd.data.builtin.register_all`), which the catalog
runs once at the first lookup.
"""

from ovd.data.builtin import register_all
from ovd.data.catalog import add_registration_hook

add_registration_hook(register_all)
