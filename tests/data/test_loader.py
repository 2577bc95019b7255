"""DeviceLoader: augmentation against a per-image reference, normalisation, epochs, resumption."""
import math

import numpy as np
import pytest
import torch

from nasprune.data import DeviceLoader, ImageDataset, crop_flip, normalize

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NP_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge"}


def make_images(n=13, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def reference_augment(img, oy, ox, flip, pad, mode="zeros"):
    """One HWC image: pad, crop at (oy, ox), then mirror; the plain per-image recipe."""
    h, w, _ = img.shape
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=NP_MODE[mode])
    out = padded[oy:oy + h, ox:ox + w]
    return out[:, ::-1] if flip else out


def reference_normalize(batch_hwc, mean=MEAN, std=STD):
    x = batch_hwc.astype(np.float64) / 255.0
    x = (x - np.array(mean)) / np.array(std)
    return x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
@pytest.mark.parametrize("shape", [(32, 32), (7, 10)])
def test_crop_flip_matches_per_image_reference(mode, shape):
    h, w = shape
    images = make_images(9, h, w)
    pad = 4 if mode != "reflect" else min(4, h - 1, w - 1)
    g = torch.Generator().manual_seed(5)
    b = 24
    index = torch.randint(0, 9, (b,), generator=g)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    oy[:2], ox[:2] = torch.tensor([0, 2 * pad]), torch.tensor([2 * pad, 0])  # the extremes
    flip = torch.randint(0, 2, (b,), generator=g).bool()
    got = crop_flip(torch.from_numpy(images), index, oy, ox, flip, pad, mode).numpy()
    for i in range(b):
        ref = reference_augment(images[index[i]], int(oy[i]), int(ox[i]), bool(flip[i]), pad, mode)
        np.testing.assert_array_equal(got[i], ref, err_msg=f"sample {i}")


def test_crop_without_offset_or_flip_is_identity():
    images = torch.from_numpy(make_images(4))
    idx = torch.tensor([3, 1])
    c = torch.full((2,), 4)
    out = crop_flip(images, idx, c, c, torch.tensor([False, True]), pad=4)
    assert torch.equal(out[0], images[3])
    assert torch.equal(out[1], images[1].flip(1))


def test_loader_batches_match_reference_with_the_documented_draws():
    """Order of draws from the generator: each epoch one randperm(N); each augmented batch
    randint(0, 2 pad + 1, (2, B)) for (oy, ox), then randint(0, 2, (B,)) for the flips."""
    images = make_images(13)
    labels = np.arange(13, dtype=np.int64) % 10
    loader = DeviceLoader(images, 5, labels=labels, shuffle=True, augment=True, seed=42,
                          device="cpu", mean=MEAN, std=STD)
    got = [(x.clone(), y.clone()) for _ in range(2) for x, y in loader]
    assert len(got) == 2 * 3 and [len(y) for _, y in got] == [5, 5, 3] * 2

    g = torch.Generator().manual_seed(42)
    k = 0
    for _ in range(2):
        perm = torch.randperm(13, generator=g)
        for start in range(0, 13, 5):
            idx = perm[start:start + 5]
            off = torch.randint(0, 9, (2, len(idx)), generator=g)
            flip = torch.randint(0, 2, (len(idx),), generator=g)
            ref = np.stack([reference_augment(images[i], int(off[0, j]), int(off[1, j]),
                                              bool(flip[j]), 4) for j, i in enumerate(idx)])
            x, y = got[k]
            np.testing.assert_allclose(x.numpy(), reference_normalize(ref), atol=1e-5, rtol=0)
            np.testing.assert_array_equal(y.numpy(), labels[idx.numpy()])
            k += 1


def test_normalisation_and_zero_padding_values():
    images = make_images(6)
    loader = DeviceLoader(images, 4, labels=np.zeros(6, np.int64), device="cpu",
                          mean=(0.5, 0.25, 0.125), std=(0.5, 2.0, 0.25))
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64
    np.testing.assert_allclose(x.numpy(), reference_normalize(images[:4], (0.5, 0.25, 0.125),
                                                              (0.5, 2.0, 0.25)), atol=1e-5)
    # A zero-padded pixel is black before normalisation: -mean/std after it.
    black = torch.tensor([-1.0, -0.125, -0.5])
    img = torch.from_numpy(images)
    out = crop_flip(img, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                    torch.tensor([False]), pad=4)
    xn = normalize(out, loader._scale, loader._shift)
    # (torch.testing.assert_close would import torch.distributed: seconds)
    np.testing.assert_allclose(xn[0, :, 0, 0].numpy(), black.numpy(), atol=1e-6)
    np.testing.assert_allclose(xn[0, :, 3, 3].numpy(), black.numpy(), atol=1e-6)
    assert not torch.allclose(xn[0, :, 4, 4], black)


def test_dataset_normalisation_and_flip_hint_are_used():
    images = make_images(8)
    ds = ImageDataset(images, np.zeros(8, np.int64), ("a",), mean=(0.1, 0.2, 0.3),
                      std=(0.3, 0.2, 0.1), hflip=False)
    loader = DeviceLoader(ds, 8, device="cpu", augment=True, pad=0, shuffle=False)
    assert loader.flip is False
    x, _ = next(iter(loader))  # pad 0 and no flip: augmentation is the identity
    np.testing.assert_allclose(x.numpy(), reference_normalize(images, ds.mean, ds.std), atol=1e-5)


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_covers_every_sample_once(drop_last):
    n, b = 37, 8
    images = make_images(n, 4, 4)
    loader = DeviceLoader(images, b, labels=np.arange(n), shuffle=True, augment=True,
                          drop_last=drop_last, device="cpu", seed=3)
    assert len(loader) == (n // b if drop_last else math.ceil(n / b))
    orders = []
    for _ in range(3):
        seen = torch.cat([y for _, y in loader]).numpy()
        assert len(seen) == len(np.unique(seen)) == (32 if drop_last else 37)
        if not drop_last:
            np.testing.assert_array_equal(np.sort(seen), np.arange(n))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    assert loader.epoch == 3
    plain = DeviceLoader(images, b, labels=np.arange(n), device="cpu")
    np.testing.assert_array_equal(torch.cat([y for _, y in plain]).numpy(), np.arange(n))


def test_seed_determinism():
    images = make_images(20)
    labels = np.arange(20)

    def run(seed):
        ld = DeviceLoader(images, 7, labels=labels, shuffle=True, augment=True, seed=seed,
                          device="cpu")
        return torch.cat([x for x, _ in ld])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_channels_last_output_and_dtype():
    images = make_images(10)
    kw = dict(labels=np.arange(10), shuffle=True, augment=True, seed=9, device="cpu")
    a = next(iter(DeviceLoader(images, 4, **kw)))[0]
    b = next(iter(DeviceLoader(images, 4, channels_last=True, **kw)))[0]
    c = next(iter(DeviceLoader(images, 4, dtype=torch.bfloat16, **kw)))[0]
    assert b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
    assert torch.equal(a, b)
    assert c.dtype == torch.bfloat16 and torch.allclose(c.float(), a, atol=0.05)


def test_cycle_runs_across_epochs():
    images = make_images(10, 4, 4)
    loader = DeviceLoader(images, 4, labels=np.arange(10), shuffle=True, device="cpu")
    it = loader.cycle()
    batches = [next(it)[1] for _ in range(3 * len(loader) + 1)]
    for e in range(3):
        ids = torch.cat(batches[e * 3:(e + 1) * 3]).numpy()
        np.testing.assert_array_equal(np.sort(ids), np.arange(10))
    assert loader.epoch == 4
    empty = DeviceLoader(images, 11, labels=np.arange(10), drop_last=True, device="cpu")
    with pytest.raises(ValueError, match="no batches"):
        next(empty.cycle())


def test_state_dict_resumes_mid_epoch():
    images = make_images(30, 8, 8)
    kw = dict(labels=np.arange(30), shuffle=True, augment=True, seed=4, device="cpu")
    a = DeviceLoader(images, 7, **kw)
    it = a.cycle()
    for _ in range(3):
        next(it)
    state = a.state_dict()
    rest = [next(it) for _ in range(8)]  # the two left in this epoch and six of the next ones
    b = DeviceLoader(images, 7, **{**kw, "seed": 999})
    b.load_state_dict(state)
    it_b = b.cycle()
    again = [next(it_b) for _ in range(8)]
    for (x1, y1), (x2, y2) in zip(rest, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.epoch == b.epoch == 3


def test_bad_inputs():
    images = make_images(4)
    with pytest.raises(ValueError, match="labels are required"):
        DeviceLoader(images, 2)
    with pytest.raises(ValueError, match="labels of shape"):
        DeviceLoader(images, 2, labels=np.arange(3), device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.astype(np.float32), 2, labels=np.arange(4), device="cpu")
    with pytest.raises(ValueError, match="padding_mode"):
        DeviceLoader(images, 2, labels=np.arange(4), device="cpu", padding_mode="circular")
    with pytest.raises(ValueError, match="mean and std need 3"):
        DeviceLoader(images, 2, labels=np.arange(4), device="cpu", mean=(0.5,), std=(0.5,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pin", [False, True])
def test_cuda_batches_on_device(pin):
    images = make_images(50)
    loader = DeviceLoader(images, 16, labels=np.arange(50), shuffle=True, augment=True,
                          device="cuda", pin_memory=pin, seed=0)
    assert loader.storage_device.type == ("cpu" if pin else "cuda")
    if pin:
        assert loader.images.is_pinned()
    ys = []
    for x, y in loader:
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
        ys.append(y.cpu())
    np.testing.assert_array_equal(np.sort(torch.cat(ys).numpy()), np.arange(50))
    # Same augmentation math as on the CPU, given the same draws.
    idx = torch.arange(16)
    off = torch.randint(0, 9, (2, 16))
    flip = torch.rand(16) < 0.5
    cpu = crop_flip(torch.from_numpy(images), idx, off[0], off[1], flip)
    gpu = crop_flip(torch.from_numpy(images).cuda(), idx.cuda(), off[0].cuda(), off[1].cuda(),
                    flip.cuda())
    assert torch.equal(cpu, gpu.cpu())
