"""The in-memory image dataset every loader returns, the data errors, and the TAS search split."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

# The per-channel normalisation the pretrained CIFAR-10 ResNets in ../shared/data were trained
# with (these are the ImageNet statistics, as in akamaster/pytorch_resnet_cifar10).
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


class DatasetError(ValueError):
    """A dataset could not be read: unknown format, corrupt file, wrong shapes, class mismatch."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset path does not exist."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Decoded images held in memory.

    images:  uint8 array (N, H, W, 3), C-contiguous.
    labels:  int64 array (N,), values in [0, len(classes)).
    classes: class names; label i is classes[i].
    mean, std: the per-channel normalisation (in [0, 1] units) recommended for this data;
        DeviceLoader uses it unless given another.
    hflip:   whether horizontal flipping is a label-preserving augmentation here (not for digits).
    name:    a short description for logs.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple
    mean: tuple = CIFAR10_MEAN
    std: tuple = CIFAR10_STD
    hflip: bool = True
    name: str = ""

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
                or images.shape[3] != 3:
            raise DatasetError(
                f"{self.name or 'dataset'}: images must be a uint8 array of shape (N, H, W, 3), "
                f"got "
                f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 \
                or labels.shape != (images.shape[0],):
            raise DatasetError(
                f"{self.name or 'dataset'}: labels must be an int64 array of shape "
                f"({images.shape[0]},), got {getattr(labels, 'dtype', type(labels).__name__)} "
                f"{getattr(labels, 'shape', '')}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DatasetError(
                f"{self.name or 'dataset'}: labels must lie in [0, {len(self.classes)}), got "
                f"[{labels.min()}, {labels.max()}]")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def __len__(self):
        return int(self.images.shape[0])

    def __repr__(self):
        n, h, w, _ = self.images.shape
        return (f"ImageDataset({self.name!r}, {n} images {h}x{w}, {len(self.classes)} classes)")

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def image_size(self):
        return tuple(self.images.shape[1:3])

    def subset(self, indices, name=None):
        """The samples at `indices` (any integer index array), same classes and normalisation."""
        indices = np.asarray(indices, dtype=np.int64)
        return replace(self, images=np.ascontiguousarray(self.images[indices]),
                       labels=self.labels[indices].copy(),
                       name=self.name if name is None else name)

    def class_counts(self):
        """int64 array (num_classes,): how many samples each class has."""
        return np.bincount(self.labels, minlength=len(self.classes)).astype(np.int64)

    def mean_std(self):
        """Per-channel mean and standard deviation of the images, in [0, 1] units."""
        total = np.zeros(3)
        squares = np.zeros(3)
        for start in range(0, len(self), 4096):  # chunks: no float64 copy of the whole set
            x = self.images[start:start + 4096].reshape(-1, 3).astype(np.float64)
            total += x.sum(0)
            squares += np.square(x).sum(0)
        count = max(1, self.images.shape[0] * self.images.shape[1] * self.images.shape[2])
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
        return tuple((mean / 255.0).tolist()), tuple((std / 255.0).tolist())


def tas_split_indices(labels, ratio=0.5, seed=111):
    """TAS's per-class split of a training set into a weight half and an architecture half.

    Follows the official recipe (AutoDL-Projects exps/TAS/prepare.py): a Python `random.Random`
    seeded with `seed` visits the classes in sorted order and, for each, samples
    int(count * ratio) of its indices for the weight set; the rest of the class goes to the
    architecture set; both lists are sorted. On the CIFAR-10 pickle batches in their standard
    order with seed 111 this gives the same indices as TAS's cifar10-0.5 split.

    Returns two sorted int64 arrays (weight_indices, arch_indices), disjoint, covering all samples.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie strictly between 0 and 1, got {ratio}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    rng = random.Random(seed)
    by_class = {}
    for index, cls in enumerate(labels.tolist()):
        by_class.setdefault(cls, []).append(index)
    weight, arch = [], []
    for cls in sorted(by_class):
        members = by_class[cls]
        chosen = rng.sample(members, int(len(members) * ratio))
        chosen_set = set(chosen)
        weight += chosen
        arch += [i for i in members if i not in chosen_set]
    return np.array(sorted(weight), dtype=np.int64), np.array(sorted(arch), dtype=np.int64)


def tas_split(dataset, ratio=0.5, seed=111):
    """Split an ImageDataset per class into (weight_set, arch_set); see tas_split_indices."""
    w, a = tas_split_indices(dataset.labels, ratio, seed)
    base = dataset.name or "train"
    return dataset.subset(w, name=f"{base}[weights]"), dataset.subset(a, name=f"{base}[arch]")
