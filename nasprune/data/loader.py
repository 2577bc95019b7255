"""Batches from a dataset held whole in device (or pinned host) memory, augmented on tensors.

The uint8 images stay as one (N, H, W, C) tensor on the device. A batch is one gather: the
random crop (zero padding by default, as the standard CIFAR recipe) and the horizontal flip are
folded into the gather's index, for the whole batch at once, with no per-image Python; then one
conversion to float with the per-channel normalisation. All randomness (epoch permutation, crop
offsets, flips) comes from one torch.Generator living where the data lives, so a CUDA loader
makes no host synchronisation, and a seed fixes every batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from nasprune.data.dataset import CIFAR10_MEAN, CIFAR10_STD, ImageDataset
from nasprune import dist

PADDING_MODES = ("zeros", "reflect", "replicate")


def _reflect(i, n):
    """Reflect indices into [0, n) without repeating the edge (numpy/torch 'reflect'), |pad| < n."""
    i = torch.where(i < 0, -i, i)
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def _rgbx(images):
    """(N, H, W, C) uint8 with C < 4 -> contiguous (N, H, W, 4), zeros after channel C."""
    n, h, w, c = images.shape
    if c >= 4:
        return images.contiguous()
    out = torch.zeros((n, h, w, 4), dtype=images.dtype, device=images.device)
    out[..., :c] = images
    return out


def crop_flip(images, index, oy, ox, flip, pad=4, padding_mode="zeros"):
    """Random-crop-and-flip as one gather.

    images: uint8 (or any) tensor (N, H, W, C), contiguous. index: int64 (B,) rows of `images`.
    oy, ox: int64 (B,), crop offsets in [0, 2 * pad] into the image padded by `pad` on each side.
    flip: bool (B,), mirror the crop left-right (crop first, then flip, as torchvision's
    RandomCrop followed by RandomHorizontalFlip).
    padding_mode: "zeros" (pad with 0, i.e. black before normalisation), "reflect", "replicate".
    Returns (B, H, W, C), a new tensor on images.device.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    n, h, w, c = images.shape
    if padding_mode == "reflect" and (pad >= h or pad >= w):
        raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {h}x{w}")
    dev = images.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h - pad                                        # (B, H)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w) - pad  # (B, W)
    mask = None
    if padding_mode == "zeros":
        if pad > 0:
            mask = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    elif padding_mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    flat = (index[:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]  # (B, H, W)
    b = index.shape[0]
    if images.dtype == torch.uint8 and c == 4 and images.is_contiguous():
        # Fast path: one 4-byte word per pixel, an elementwise gather (4x faster on CPU).
        out = images.view(torch.int32).reshape(-1).take(flat)
        if mask is not None:
            out.mul_(mask)
        return out.view(torch.uint8).reshape(b, h, w, 4)
    out = images.reshape(n * h * w, c).index_select(0, flat.reshape(-1)).reshape(b, h, w, c)
    if mask is not None:
        out.mul_(mask[..., None].to(out.dtype))
    return out


def normalize(batch, scale, shift, dtype=torch.float32, channels_last=False):
    """uint8 (B, H, W, C) -> float (B, C, H, W): x * scale - shift, with scale = 1 / (255 std) and
    shift = mean / std shaped (1, C, 1, 1); channels_last picks the output memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=fmt)
    x.mul_(scale).sub_(shift)
    return x if dtype == torch.float32 else x.to(dtype)


class DeviceLoader:
    """Iterate (images, labels) batches of a dataset kept whole in device or pinned memory.

    data: an ImageDataset, or a uint8 array/tensor (N, H, W, C) with `labels` (N,).
    batch_size; shuffle: new permutation each epoch; drop_last: skip the final short batch.
    augment: random crop (pad `pad`, `padding_mode`) and, if `flip` (default: the dataset's
        hflip hint, else True), horizontal flip with probability 1/2.
    mean, std: per-channel normalisation in [0, 1] units; default: the dataset's, else the
        pretrained CIFAR-10 ResNets' (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
    device: where batches are produced (default: cuda if available, else cpu).
    pin_memory: keep the dataset in pinned host memory and copy each uint8 batch to the device
        asynchronously (for datasets too big for the device); otherwise it lives on the device.
    channels_last: output in torch.channels_last memory format. dtype: output float dtype.
    seed / generator: the randomness; a given generator must live where the data lives
        (`loader.storage_device`).
    views: augmented views per image (each drawn on its own, in turn, from the one generator);
    with_index: also yield the batch's sample indices into the data (FFP's memory bank).
    rank, world_size: under torchrun (default: torch.distributed's, 1 process otherwise) every
        rank draws the same seeded order and augmentation of each global batch of `batch_size`
        and yields its own slice of it (batch_size / world_size images; batch_size must be
        divisible by world_size), so the ranks together see exactly the one-process batches.

    Yields (x, y): x float (B, C, H, W) normalised, y int64 (B,), both on `device`; with
    views > 1, x is a tuple of `views` such tensors; with_index appends the indices (B,) int64.
    `len(loader)` is the number of batches per epoch; `cycle()` yields batches forever (a new
    epoch, reshuffled, after each); `state_dict()` / `load_state_dict()` resume mid-epoch.
    """

    def __init__(self, data, batch_size, *, labels=None, shuffle=False, augment=False,
                 drop_last=False, mean=None, std=None, device=None, pin_memory=False,
                 channels_last=False, pad=4, padding_mode="zeros", flip=None, seed=0,
                 generator=None, dtype=torch.float32, views=1, with_index=False, rank=None, world_size=None):
        if isinstance(data, ImageDataset):
            if labels is not None:
                raise ValueError("labels come from the ImageDataset; do not pass them too")
            images, labels = data.images, data.labels
            mean = data.mean if mean is None else mean
            std = data.std if std is None else std
            flip = data.hflip if flip is None else flip
        else:
            images = data
            if labels is None:
                raise ValueError("labels are required when data is an array or tensor")
        mean = CIFAR10_MEAN if mean is None else mean
        std = CIFAR10_STD if std is None else std
        images = torch.as_tensor(images) if isinstance(images, np.ndarray) else images
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 of shape (N, H, W, C), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} for {images.shape[0]} images")
        c = images.shape[3]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need {c} values, got {len(mean)} and {len(std)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be a positive int, got {views!r}")
        self.views, self.with_index = views, bool(with_index)
        self.rank = dist.rank() if rank is None else int(rank)
        self.world_size = dist.world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside 0..{self.world_size - 1} (world_size {self.world_size})")
        if int(batch_size) % self.world_size:
            raise ValueError(f"batch_size {batch_size} is the global batch, split evenly over the "
                             f"{self.world_size} ranks: make it a multiple of {self.world_size}")

        self.device = torch.device(device if device is not None
                                   else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.channels = c
        if pin_memory and self.device.type != "cpu" and torch.cuda.is_available():
            self.storage_device = torch.device("cpu")
            images = _rgbx(images.cpu()).pin_memory()
            labels = labels.cpu().to(torch.int64).pin_memory()
        else:
            self.storage_device = self.device
            images = _rgbx(images.to(self.device))
            labels = labels.to(self.device, torch.int64)
        # The stored images: (N, H, W, 4) with a zero fourth channel when C is 1 to 3, so a pixel
        # is one 4-byte word for crop_flip's fast gather; `self.channels` are the real ones.
        self.images, self.labels = images, labels
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.drop_last = bool(shuffle), bool(augment), bool(drop_last)
        self.pad, self.padding_mode = int(pad), padding_mode
        self.flip = True if flip is None else bool(flip)
        self.channels_last, self.dtype = bool(channels_last), dtype
        std_t = torch.tensor(std, dtype=torch.float64)
        mean_t = torch.tensor(mean, dtype=torch.float64)
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._scale = (1.0 / (255.0 * std_t)).float().view(1, c, 1, 1).to(self.device)
        self._shift = (mean_t / std_t).float().view(1, c, 1, 1).to(self.device)
        if generator is None:
            generator = torch.Generator(device=self.storage_device)
            generator.manual_seed(int(seed))
        elif torch.device(generator.device).type != self.storage_device.type:
            raise ValueError(f"the generator lives on {generator.device} but the data on "
                             f"{self.storage_device}")
        self.generator = generator
        self.epoch = 0        # epochs started
        self._perm = None     # this epoch's order
        self._position = 0    # batches yielded this epoch
        self._resume = False  # a loaded state: the next __iter__ continues its epoch

    # -- sizes
    @property
    def num_samples(self):
        return int(self.images.shape[0])

    def __len__(self):
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    # -- iteration
    def _new_order(self):
        n = self.num_samples
        if self.shuffle:
            return torch.randperm(n, generator=self.generator, device=self.storage_device)
        return torch.arange(n, device=self.storage_device)

    @property
    def local_batch_size(self):
        """Images of a full batch this rank yields (batch_size / world_size)."""
        return self.batch_size // self.world_size

    def _batch(self, index):
        # index: the global batch; randomness is drawn for all of it (every rank alike), then
        # each rank keeps its slice
        part = slice(*dist.shard_bounds(index.shape[0], self.rank, self.world_size))
        if self.views == 1 and not self.with_index:
            return self._view(index, part)
        xs = [self._view(index, part) for _ in range(self.views)]
        x, y = (xs[0][0] if self.views == 1 else tuple(v[0] for v in xs)), xs[0][1]
        if not self.with_index:
            return x, y
        return x, y, index[part].to(self.device, non_blocking=True)

    def _view(self, index, part=slice(None)):
        if self.augment:
            b, g, dev = index.shape[0], self.generator, self.storage_device
            offsets = torch.randint(0, 2 * self.pad + 1, (2, b), generator=g, device=dev)
            if self.flip:
                flip = torch.randint(0, 2, (b,), generator=g, device=dev).bool()
            else:
                flip = torch.zeros(b, dtype=torch.bool, device=dev)
            index = index[part]
            x = crop_flip(self.images, index, offsets[0, part], offsets[1, part], flip[part], self.pad,
                          self.padding_mode)
        else:
            index = index[part]
            x = self.images.index_select(0, index)
        x = x[..., :self.channels]
        y = self.labels.index_select(0, index)
        if self.storage_device != self.device:
            x = x.contiguous().pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        return normalize(x, self._scale, self._shift, self.dtype, self.channels_last), y

    def __iter__(self):
        if self._resume:
            self._resume = False
            start = self._position
        else:
            self._perm = self._new_order()
            self.epoch += 1
            start = self._position = 0
        perm, b = self._perm, self.batch_size
        for i in range(start, len(self)):
            self._position = i + 1
            yield self._batch(perm[i * b:(i + 1) * b])

    def cycle(self):
        """Batches forever, epoch after epoch (each reshuffled if shuffle): for drawing, e.g.,
        architecture batches alongside a loop over weight batches."""
        if len(self) == 0:
            raise ValueError(f"no batches: {self.num_samples} samples, batch_size "
                             f"{self.batch_size}, drop_last={self.drop_last}")
        while True:
            yield from self

    # -- checkpointing
    def state_dict(self):
        """Where the iteration stands: restoring it (same data and settings) replays the rest of
        the current epoch, and every later one, exactly."""
        return {
            "epoch": self.epoch,
            "position": self._position,
            "perm": None if self._perm is None else self._perm.cpu(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state):
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])
        perm = state["perm"]
        self._perm = None if perm is None else perm.to(self.storage_device)
        self.generator.set_state(state["generator"])
        self._resume = self._perm is not None and self._position < len(self)

    def __repr__(self):
        shard = f", rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
        return (f"DeviceLoader({self.num_samples} samples, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, augment={self.augment}, device={self.device}{shard})")
