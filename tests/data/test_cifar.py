"""CIFAR-10 in every format, the cache, the errors, the TAS split, and the digits default."""
import io
import os
import pickle
import struct
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nasprune import data as D
from nasprune.data import cifar as C

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("NASPRUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
REAL_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"

CLASSES = ("cat", "dog", "ship")
N_TRAIN, N_TEST = 5, 2  # per class; 15 train images make three per pickle batch


# ---------------------------------------------------------------------------------------------
# Synthetic datasets


def synthetic(seed=0):
    """Random 32x32 RGB images, class-major (the order every format must give back)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = rng.integers(0, 256, (len(CLASSES) * n, 32, 32, 3), dtype=np.uint8)
        y = np.repeat(np.arange(len(CLASSES), dtype=np.int64), n)
        out[split] = (x, y)
    return out


class Py2Pickler(pickle._Pickler):
    """Writes bytes with Python 2's STRING opcodes, as the dataset authors' cPickle did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256
                    else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # The original files name numpy's reconstructor by its numpy-1 module.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_pickles(folder, ds, style="py2"):
    folder.mkdir(parents=True)
    dump = py2_pickle if style == "py2" else (lambda o: pickle.dumps(o, protocol=4))
    key = (lambda k: k.encode()) if style == "py2" else (lambda k: k)

    def batch(x, y, name):
        return {key("batch_label"): key(name), key("labels"): [int(v) for v in y],
                key("data"): x.transpose(0, 3, 1, 2).reshape(len(x), -1).copy(),
                key("filenames"): [key(f"{i}.png") for i in range(len(x))]}

    x, y = ds["train"]
    for i, (xs, ys) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5)), 1):
        (folder / f"data_batch_{i}").write_bytes(dump(batch(xs, ys, f"training batch {i}")))
    (folder / "test_batch").write_bytes(dump(batch(*ds["test"], "testing batch 1")))
    meta = {key("label_names"): [key(c) for c in CLASSES], key("num_vis"): 3072}
    (folder / "batches.meta").write_bytes(dump(meta))
    return folder


def write_tree(root, ds, fmt="png"):
    for split in ("train", "test"):
        x, y = ds[split]
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.{fmt}")
    return root


def write_tar(file, folder, arcname=""):
    with tarfile.open(file, "w:gz") as tf:
        for p in sorted(folder.rglob("*")):
            tf.add(p, arcname=str(Path(arcname) / p.relative_to(folder)), recursive=False)
    return file


def assert_same(result, ds, classes=CLASSES):
    train, test = result
    for got, split in ((train, "train"), (test, "test")):
        x, y = ds[split]
        assert got.images.dtype == np.uint8 and got.images.shape == x.shape
        assert got.labels.dtype == np.int64
        np.testing.assert_array_equal(got.images, x)
        np.testing.assert_array_equal(got.labels, y)
        assert got.classes == classes


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("layout", ["pickle-dir", "pickle-parent", "pickle-py3", "pickle-tar",
                                    "png-tree", "png-tree-wrapped", "png-tar", "png-tar-wrapped"])
def test_every_format_gives_the_same_arrays(tmp_path, layout):
    ds = synthetic()
    if layout == "pickle-dir":
        path = write_pickles(tmp_path / "cifar-10-batches-py", ds)
    elif layout == "pickle-parent":
        write_pickles(tmp_path / "dl" / "cifar-10-batches-py", ds)
        path = tmp_path / "dl"
    elif layout == "pickle-py3":
        path = write_pickles(tmp_path / "b", ds, style="py3")
    elif layout == "pickle-tar":  # the official cifar-10-python.tar.gz
        write_pickles(tmp_path / "src" / "cifar-10-batches-py", ds)
        path = write_tar(tmp_path / "cifar-10-python.tar.gz", tmp_path / "src")
    elif layout == "png-tree":
        path = write_tree(tmp_path / "tree", ds)
    elif layout == "png-tree-wrapped":
        write_tree(tmp_path / "outer" / "CIFAR-10-images", ds)
        path = tmp_path / "outer"
    elif layout == "png-tar":
        path = write_tar(tmp_path / "c.tar.gz", write_tree(tmp_path / "tree", ds))
    else:
        path = write_tar(tmp_path / "c.tgz", write_tree(tmp_path / "tree", ds), "CIFAR-10-images")
    assert_same(D.load_cifar10(path, cache_dir=False), ds)


def test_jpeg_tree_matches_pillow_decode(tmp_path):
    ds = synthetic(1)
    tar = write_tar(tmp_path / "j.tar.gz", write_tree(tmp_path / "tree", ds, "jpg"))
    train, test = D.load_cifar10(tar, cache_dir=False)
    ref = np.asarray(Image.open(tmp_path / "tree" / "train" / "dog" / "0006.jpg").convert("RGB"))
    np.testing.assert_array_equal(train.images[6], ref)  # dog is label 1, so train index 5..9
    np.testing.assert_array_equal(train.labels, ds["train"][1])
    # JPEG is lossy, so the decode differs from the source pixels, but only a little.
    assert 0 < np.abs(train.images.astype(int) - ds["train"][0]).mean() < 60


def test_pool_decode_equals_serial(tmp_path):
    ds = synthetic(2)
    tree = write_tree(tmp_path / "tree", ds)
    files = sorted(str(p) for p in tree.rglob("*.png"))
    entries = [(f, f) for f in files]
    serial = D.decode_images(entries, workers=0)
    np.testing.assert_array_equal(serial[0], np.asarray(Image.open(files[0])))
    # 840 images make several chunks, decoded by two worker processes and reassembled in order.
    seen = []
    pooled = D.decode_images(entries * 40, workers=2, progress=lambda done, total, desc: seen.append((done, total)))
    np.testing.assert_array_equal(pooled, np.concatenate([serial] * 40))
    assert len(seen) > 1 and seen[-1] == (840, 840)  # one call per finished chunk, counting up


def test_limit_per_class(tmp_path):
    ds = synthetic()
    train, test = D.load_cifar10(write_tree(tmp_path / "t", ds), cache_dir=False,
                                 limit_per_class=2)
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(train.images[2:4], ds["train"][0][5:7])
    assert len(test) == 6
    ptrain, _ = D.load_cifar10(write_pickles(tmp_path / "p", ds), cache_dir=False,
                               limit_per_class=2)
    np.testing.assert_array_equal(ptrain.images, train.images)


def test_pixel_modes_become_rgb(tmp_path):
    ds = synthetic()
    tree = write_tree(tmp_path / "t", ds)
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(grey, "L").save(tree / "train" / "cat" / "0000.png")
    rgba = np.dstack([ds["train"][0][1], np.full((32, 32), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tree / "train" / "cat" / "0001.png")
    train, _ = D.load_cifar10(tree, cache_dir=False)
    np.testing.assert_array_equal(train.images[0], np.repeat(grey[..., None], 3, 2))
    np.testing.assert_array_equal(train.images[1], ds["train"][0][1])


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    ds = synthetic()
    tree = write_tree(tmp_path / "t", ds)
    (tree / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (tree / "train" / "cat" / "notes.txt").write_text("junk")
    (tree / "README").write_text("junk")
    assert_same(D.load_cifar10(tree, cache_dir=False), ds)


# ---------------------------------------------------------------------------------------------
# Restricted unpickling


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_unpickler_refuses_other_globals(tmp_path):
    ds = synthetic()
    folder = write_pickles(tmp_path / "b", ds)
    target = tmp_path / "pwned"
    payload = {"data": ds["train"][0][:3].reshape(3, -1), "labels": [0, 0, 0],
               "x": _Evil(str(target))}
    (folder / "data_batch_3").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(D.UnsafePickleError) as e:
        D.load_cifar10(folder, cache_dir=False)
    assert "'io.open'" in str(e.value) and "data_batch_3" in str(e.value)
    assert not target.exists()
    assert isinstance(e.value, pickle.UnpicklingError) and isinstance(e.value, D.DatasetError)


def test_unpickler_allows_only_numpy_reconstruction():
    allowed = set(D.RestrictedUnpickler.ALLOWED)
    assert allowed == {("numpy.core.multiarray", "_reconstruct"),
                       ("numpy._core.multiarray", "_reconstruct"),
                       ("numpy", "ndarray"), ("numpy", "dtype")}
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    got = C.restricted_load(py2_pickle({b"a": arr}), "x")
    np.testing.assert_array_equal(got["a"], arr)
    with pytest.raises(D.UnsafePickleError, match="numpy.load"):
        C.restricted_load(pickle.dumps(np.load, protocol=2), "x")


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_skips_decoding(tmp_path, monkeypatch):
    ds = synthetic()
    tar = write_tar(tmp_path / "c.tar.gz", write_tree(tmp_path / "tree", ds))
    cache = tmp_path / "cache"
    calls = []
    real = C._Source.decode

    def counting(self, *a, **k):
        calls.append(self.path)
        return real(self, *a, **k)

    monkeypatch.setattr(C._Source, "decode", counting)
    first = D.load_cifar10(tar, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(calls) == 1 and len(files) == 1 and files[0].suffix == ".npz"  # no temp files
    second = D.load_cifar10(tar, cache_dir=cache)
    assert len(calls) == 1
    assert_same(second, ds)
    assert_same(first, ds)
    assert second[0].classes == CLASSES

    # A changed source (new mtime) is a miss, and so is another limit_per_class.
    st = os.stat(tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    D.load_cifar10(tar, cache_dir=cache)
    assert len(calls) == 2
    D.load_cifar10(tar, cache_dir=cache, limit_per_class=1)
    assert len(calls) == 3 and len(list(cache.iterdir())) == 3


def test_image_tree_cache_sees_changed_files(tmp_path):
    ds = synthetic()
    tree = write_tree(tmp_path / "tree", ds)
    cache = tmp_path / "cache"
    D.load_cifar10(tree, cache_dir=cache)
    new = ds["test"][0][0].copy()
    new[0, 0] = 255 - new[0, 0]
    f = tree / "test" / "cat" / "0000.png"
    Image.fromarray(new).save(f)
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10_000_000_000))
    _, test = D.load_cifar10(tree, cache_dir=cache)
    np.testing.assert_array_equal(test.images[0], new)


def test_corrupt_cache_is_rebuilt(tmp_path):
    ds = synthetic()
    path = write_pickles(tmp_path / "b", ds)
    cache = tmp_path / "cache"
    D.load_cifar10(path, cache_dir=cache)
    (f,) = cache.iterdir()
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="unreadable cache"):
        assert_same(D.load_cifar10(path, cache_dir=cache), ds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(D.load_cifar10(path, cache_dir=cache), ds)  # rewritten, now a clean hit


def test_no_cache_and_default_cache_dir(tmp_path, monkeypatch):
    ds = synthetic()
    path = write_pickles(tmp_path / "b", ds)
    monkeypatch.setenv("NASPRUNE_CACHE_DIR", str(tmp_path / "env-cache"))
    assert D.default_cache_dir() == tmp_path / "env-cache"
    D.load_cifar10(path, cache_dir=False)
    assert not (tmp_path / "env-cache").exists()
    D.load_cifar10(path)
    assert len(list((tmp_path / "env-cache").glob("cifar10-b-*.npz"))) == 1


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_path(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="nowhere") as e:
        D.load_cifar10(tmp_path / "nowhere")
    assert isinstance(e.value, FileNotFoundError)


def test_unknown_format(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"hello")
    with pytest.raises(D.DatasetError, match="data.bin: unknown dataset format"):
        D.load_cifar10(f, cache_dir=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetError, match="empty: not a CIFAR image tree"):
        D.load_cifar10(tmp_path / "empty", cache_dir=False)


def test_corrupt_archive(tmp_path):
    ds = synthetic()
    tar = write_tar(tmp_path / "c.tar.gz", write_tree(tmp_path / "tree", ds))
    blob = tar.read_bytes()
    cases = (("cut.tar.gz", blob[: len(blob) // 2]), ("junk.tar.gz", b"\x1f\x8b" + b"x" * 99))
    for name, data in cases:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(D.DatasetError, match=f"{name}: corrupt or truncated archive"):
            D.load_cifar10(tmp_path / name, cache_dir=False)


def test_class_folder_mismatch(tmp_path):
    tree = write_tree(tmp_path / "t", synthetic())
    (tree / "test" / "dog").rename(tree / "test" / "horse")
    with pytest.raises(D.DatasetError, match=r"only in train \['dog'\], only in test \['horse'\]"):
        D.load_cifar10(tree, cache_dir=False)
    tar = write_tar(tmp_path / "t.tar.gz", tree)
    with pytest.raises(D.DatasetError, match=r"t.tar.gz: class folders differ"):
        D.load_cifar10(tar, cache_dir=False)


def test_empty_class_folder(tmp_path):
    tree = write_tree(tmp_path / "t", synthetic())
    for f in (tree / "test" / "ship").iterdir():
        f.unlink()
    with pytest.raises(D.DatasetError, match=r"without images in test/: \['ship'\]"):
        D.load_cifar10(tree, cache_dir=False)


def test_wrong_image_size_and_corrupt_image(tmp_path):
    tree = write_tree(tmp_path / "t", synthetic())
    Image.new("RGB", (16, 16)).save(tree / "train" / "dog" / "0005.png")
    with pytest.raises(D.DatasetError, match=r"dog/0005.png: image is 16x16, expected 32x32"):
        D.load_cifar10(tree, cache_dir=False)
    Image.new("RGB", (32, 32)).save(tree / "train" / "dog" / "0005.png")
    (tree / "test" / "ship" / "0004.png").write_bytes(b"not a png")
    with pytest.raises(D.DatasetError, match=r"ship/0004.png: cannot decode image"):
        D.load_cifar10(tree, cache_dir=False)


def test_pickle_errors(tmp_path):
    ds = synthetic()
    folder = write_pickles(tmp_path / "b", ds)
    (folder / "data_batch_4").unlink()
    with pytest.raises(D.DatasetError, match=r"missing \['data_batch_4'\]"):
        D.load_cifar10(folder, cache_dir=False)
    bad = {"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}
    (folder / "data_batch_4").write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(D.DatasetError, match=r"data_batch_4: 'data' must be .* \(3, 100\)"):
        D.load_cifar10(folder, cache_dir=False)
    bad = {"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]}
    (folder / "data_batch_4").write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(D.DatasetError, match=r"data_batch_4: 3 images but labels of shape \(2,\)"):
        D.load_cifar10(folder, cache_dir=False)
    (folder / "data_batch_4").write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    with pytest.raises(D.DatasetError, match=r"data_batch_4: not a readable CIFAR pickle batch"):
        D.load_cifar10(folder, cache_dir=False)


# ---------------------------------------------------------------------------------------------
# TAS split


def test_tas_split_per_class_half_disjoint_deterministic():
    labels = np.repeat(np.arange(4), [10, 11, 6, 1])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    w, a = D.tas_split_indices(labels)
    assert len(np.intersect1d(w, a)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([w, a])), np.arange(len(labels)))
    assert np.all(np.diff(w) > 0) and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(np.bincount(labels[w], minlength=4), [5, 5, 3, 0])
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=4), [5, 6, 3, 1])
    w2, a2 = D.tas_split_indices(labels, seed=111)
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_array_equal(a, a2)
    w3, _ = D.tas_split_indices(labels, seed=112)
    assert not np.array_equal(w, w3)
    w4, a4 = D.tas_split_indices(labels, ratio=0.8)
    np.testing.assert_array_equal(np.bincount(labels[w4], minlength=4), [8, 8, 4, 0])


def test_tas_split_datasets():
    train, _ = D.load_digits()
    weights, arch = D.tas_split(train)
    assert len(weights) + len(arch) == len(train)
    assert np.all(np.abs(weights.class_counts() - arch.class_counts()) <= 1)
    w, _ = D.tas_split_indices(train.labels)
    np.testing.assert_array_equal(weights.images, train.images[w])
    assert weights.classes == train.classes and weights.mean == train.mean


# ---------------------------------------------------------------------------------------------
# The embedded default


def test_digits_default():
    train, test = D.load_dataset(None)
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.classes == tuple("0123456789")
    np.testing.assert_array_equal(train.images[..., 0], train.images[..., 2])
    assert train.images.max() == 255 and train.images.min() == 0
    # stratified 80/20
    frac = test.class_counts() / (train.class_counts() + test.class_counts())
    assert np.all(np.abs(frac - 0.2) < 0.02)
    assert not train.hflip
    m, s = train.mean_std()
    assert np.allclose(train.mean, m) and np.allclose(train.std, s)
    again, _ = D.load_digits()
    np.testing.assert_array_equal(again.images, train.images)
    other, _ = D.load_digits(seed=1)
    assert not np.array_equal(other.labels, train.labels)
    small, _ = D.load_digits(size=16)
    assert small.images.shape[1:] == (16, 16, 3) and len(small) == len(train)


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = D.load_digits(size=8)
    allx = np.concatenate([train.images[..., 0], test.images[..., 0]]).astype(np.float64)
    ally = np.concatenate([train.labels, test.labels])
    ref = np.round(bunch.images * 255 / 16)
    # Same multiset of (image, label) pairs.
    key = lambda x, y: sorted(zip(map(bytes, x.astype(np.uint8).reshape(len(x), -1)), y.tolist()))
    assert key(allx, ally) == key(ref, bunch.target)


# ---------------------------------------------------------------------------------------------
# The real CIFAR-10 JPEG copy


needs_real = pytest.mark.skipif(
    not REAL_TAR.is_file(), reason=f"needs the shared CIFAR-10 JPEG copy at {REAL_TAR} (absent)")


@needs_real
def test_real_cifar10_jpeg_subset():
    """Cheap: the first 50 train and 10 test images of each class (reads the whole archive)."""
    train, test = D.load_cifar10(REAL_TAR, cache_dir=False, limit_per_class=50)
    assert train.classes == D.CIFAR10_CLASSES
    np.testing.assert_array_equal(train.class_counts(), [50] * 10)
    np.testing.assert_array_equal(test.class_counts(), [50] * 10)
    assert train.images.shape == (500, 32, 32, 3) and train.images.dtype == np.uint8
    with tarfile.open(REAL_TAR) as tf:
        ref = np.asarray(Image.open(tf.extractfile("train/bird/0003.jpg")).convert("RGB"))
    np.testing.assert_array_equal(train.images[2 * 50 + 3], ref)


@needs_real
def test_real_cifar10_jpeg_full():
    """All 60,000 images, through the user cache (NASPRUNE_CACHE_DIR or ~/.cache/nasprune): the
    first run decodes (about 10 s on 2 idle cores), later runs load the cache (about 1 s)."""
    t0 = time.perf_counter()
    train, test = D.load_cifar10(REAL_TAR)
    t1 = time.perf_counter()
    again, _ = D.load_cifar10(REAL_TAR)
    t2 = time.perf_counter()
    print(f"first load {t1 - t0:.1f} s, cached load {t2 - t1:.2f} s")
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.images.shape == (50_000, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.classes == D.CIFAR10_CLASSES
    np.testing.assert_array_equal(train.class_counts(), [5000] * 10)
    np.testing.assert_array_equal(test.class_counts(), [1000] * 10)
    mean = train.images.mean(axis=(0, 1, 2), dtype=np.float64) / 255
    assert np.allclose(mean, [0.491, 0.482, 0.447], atol=0.01)  # the known CIFAR-10 mean
    np.testing.assert_array_equal(again.images, train.images)
    w, a = D.tas_split(train)
    np.testing.assert_array_equal(w.class_counts(), [2500] * 10)
    np.testing.assert_array_equal(a.class_counts(), [2500] * 10)
