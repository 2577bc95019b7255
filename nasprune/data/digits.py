"""The embedded default dataset: scikit-learn's handwritten digits as a small CIFAR-like set.

scikit-learn ships the 1,797 8x8 grey digit images (UCI optical recognition of handwritten
digits) inside the package, so this needs no download. They are scaled to 0..255, resized
bilinearly to size x size, replicated to 3 channels and split per class (seeded) into train and
test, and returned as the same ImageDataset pair as load_cifar10.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from nasprune.data.dataset import ImageDataset


def _resize(images, size):
    """Float images (N, 8, 8) in 0..255 -> uint8 (N, size, size), bilinear, half-pixel centres."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images.astype(np.float32))[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def _digits_arrays():
    """(pixels float (1797, 64) in 0..16, labels int64 (1797,)) from the copy inside
    scikit-learn, read directly (importing sklearn.datasets costs seconds)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            file = os.path.join(root, "datasets", "data", "digits.csv.gz")
            if os.path.isfile(file):
                table = np.loadtxt(file, delimiter=",", dtype=np.float64)
                if table.shape == (1797, 65):
                    return table[:, :64], table[:, 64].astype(np.int64)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("the embedded digits dataset needs scikit-learn "
                          "(pip install scikit-learn)") from e
    bunch = sk_load_digits()
    return bunch.data.astype(np.float64), bunch.target.astype(np.int64)


def load_digits(size=32, test_fraction=0.2, seed=0):
    """scikit-learn's digits as (train, test) ImageDatasets of uint8 (N, size, size, 3) images.

    size: output side in pixels (32 matches CIFAR-10 models; 16 is four times cheaper).
    test_fraction: share of each class held out for test (default 0.2: 1,434 train / 363 test).
    seed: the numpy seed of the per-class split.
    The datasets carry their own normalisation (per-channel mean/std of the train images) and
    hflip=False: mirrored digits are not the same digits.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    if int(size) < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    pixels, labels = _digits_arrays()
    grey = _resize(pixels.reshape(-1, 8, 8) * (255.0 / 16.0), int(size))
    images = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=3))
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(len(members) * test_fraction)))
        test_idx.append(rng.choice(members, size=k, replace=False))
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    classes = tuple(str(c) for c in range(10))
    train_x, train_y = np.ascontiguousarray(images[~is_test]), labels[~is_test]
    flat = train_x.reshape(-1, 3).astype(np.float64) / 255.0
    mean = tuple(flat.mean(0).tolist())
    std = tuple(np.maximum(flat.std(0), 1e-3).tolist())
    return (
        ImageDataset(train_x, train_y, classes, mean, std, hflip=False, name="digits:train"),
        ImageDataset(np.ascontiguousarray(images[is_test]), labels[is_test], classes, mean, std,
                     hflip=False, name="digits:test"),
    )
