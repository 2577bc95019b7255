"""Datasets and batch loading.

    train, test = load_dataset(None)                     # embedded default: sklearn digits
    train, test = load_dataset("../shared/data/cifar10-jpeg.tar.gz")   # CIFAR-10, cached
    weights, arch = tas_split(train)                     # TAS's per-class 50/50, seed 111
    loader = DeviceLoader(weights, 256, shuffle=True, augment=True, device="cuda")
    for x, y in loader: ...
"""
from nasprune.data.cifar import (
    RestrictedUnpickler, UnsafePickleError, decode_images, default_cache_dir, load_cifar10,
)
from nasprune.data.dataset import (
    CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, DatasetError, DatasetNotFoundError, ImageDataset,
    tas_split, tas_split_indices,
)
from nasprune.data.digits import load_digits
from nasprune.data.loader import DeviceLoader, crop_flip, normalize

DEFAULT_DATASET = "digits"


def load_dataset(spec=None, cache_dir=None, **kwargs):
    """(train, test) ImageDatasets from a command-line style spec.

    None or "digits": the embedded scikit-learn digits (kwargs go to load_digits);
    anything else: a path for load_cifar10 (kwargs go to it, with cache_dir).
    """
    if spec is None or str(spec) == DEFAULT_DATASET:
        return load_digits(**kwargs)
    return load_cifar10(spec, cache_dir=cache_dir, **kwargs)


__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "DEFAULT_DATASET", "DatasetError",
    "DatasetNotFoundError", "DeviceLoader", "ImageDataset", "RestrictedUnpickler",
    "UnsafePickleError", "crop_flip", "decode_images", "default_cache_dir", "load_cifar10",
    "load_dataset", "load_digits", "normalize", "tas_split", "tas_split_indices",
]
