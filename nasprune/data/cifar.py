"""CIFAR-10 from the formats users have, decoded once and cached.

Formats, detected from `path`:
  * the python pickle batches: a folder holding data_batch_1..5 and test_batch (the
    `cifar-10-batches-py` folder, or a folder containing it), or the official
    `cifar-10-python.tar.gz` holding that folder;
  * an image-folder tree `train/<class>/<image>` and `test/<class>/<image>` (PNG, JPEG, BMP,
    WebP, GIF; read with Pillow), possibly wrapped in one top-level folder;
  * a tar archive (.tar, .tar.gz, .tgz, ...) of such a tree, e.g.
    ../shared/data/cifar10-jpeg.tar.gz.

The pickle batches are read with a restricted unpickler that resolves only the numpy globals an
array needs (ndarray, dtype and the array reconstructor); any other global is refused.

Decoded arrays are cached as an uncompressed .npz (no pickled objects) under the cache folder,
keyed by the source's path, sizes and modification times; the write is atomic (temporary file,
then os.replace), so concurrent or interrupted runs never leave a half-written cache.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path, PurePosixPath

import numpy as np

from nasprune.data.dataset import (
    CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, DatasetError, DatasetNotFoundError, ImageDataset,
)

CACHE_VERSION = "nasprune-cifar-cache-v1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".ppm", ".tif", ".tiff")
PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST = "test_batch"
PICKLE_META = "batches.meta"
PICKLE_NAMES = PICKLE_TRAIN + (PICKLE_TEST, PICKLE_META)
SPLITS = ("train", "test")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
IMAGE_SIZE = (32, 32)
# Below this many images the decode runs in this process; above it, in a process pool.
POOL_THRESHOLD = 4096


def default_cache_dir():
    """$NASPRUNE_CACHE_DIR, else $XDG_CACHE_HOME/nasprune, else ~/.cache/nasprune."""
    if os.environ.get("NASPRUNE_CACHE_DIR"):
        return Path(os.environ["NASPRUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nasprune"


# --------------------------------------------------------------------------------------------
# Restricted unpickling of the pickle batches


class UnsafePickleError(DatasetError, pickle.UnpicklingError):
    """A pickle asked for a global outside the numpy-array allow-list."""


def _numpy_globals():
    reconstruct = np.ndarray(0).__reduce__()[0]  # numpy's array reconstructor, in any version
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,   # numpy < 2 and the CIFAR files
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # numpy >= 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; refuses every other global."""

    ALLOWED = _numpy_globals()

    def __init__(self, file, source="<pickle>", **kwargs):
        kwargs.setdefault("encoding", "latin1")  # the CIFAR batches were written by Python 2
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in self.ALLOWED)
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle global '{module}.{name}'; a CIFAR-10 batch "
                f"holds only dicts, lists and numpy arrays (allowed globals: {allowed})") from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refusing a pickle with persistent ids")


def restricted_load(data, source):
    """Unpickle `data` (bytes) with RestrictedUnpickler; errors name `source`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a damaged file
        raise DatasetError(
            f"{source}: not a readable CIFAR pickle batch ({type(e).__name__}: {e})") from e


def _str_keys(d):
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _parse_batch(obj, source):
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    d = _str_keys(obj)
    if "data" not in d or "labels" not in d:
        hint = " (this looks like CIFAR-100)" if "fine_labels" in d else ""
        raise DatasetError(f"{source}: a CIFAR-10 batch needs 'data' and 'labels' entries, found "
                           f"{sorted(d)}{hint}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{source}: 'data' must be a uint8 array of shape (N, 3072), got "
                           f"{getattr(data, 'dtype', type(data).__name__)} "
                           f"{getattr(data, 'shape', '')}")
    try:
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{source}: 'labels' is not a list of integers ({e})") from e
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{source}: {data.shape[0]} images but labels of shape {labels.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _parse_meta(obj, source):
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    names = _str_keys(obj).get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise DatasetError(f"{source}: no 'label_names' list")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def _decode_pickles(blobs, where, limit_per_class):
    """blobs: {basename: bytes} with the five train batches, test_batch, maybe batches.meta."""
    missing = [n for n in PICKLE_TRAIN + (PICKLE_TEST,) if n not in blobs]
    if missing:
        raise DatasetError(f"{where}: CIFAR-10 pickle batches incomplete, missing {missing}")
    classes = CIFAR10_CLASSES
    if PICKLE_META in blobs:
        classes = _parse_meta(restricted_load(blobs[PICKLE_META], f"{where}/{PICKLE_META}"),
                              f"{where}/{PICKLE_META}")
    out = {}
    for split, names in (("train", PICKLE_TRAIN), ("test", (PICKLE_TEST,))):
        parts = [_parse_batch(restricted_load(blobs[n], f"{where}/{n}"), f"{where}/{n}")
                 for n in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DatasetError(f"{where}: {split} labels span [{labels.min()}, {labels.max()}] "
                               f"but there are {len(classes)} classes")
        if limit_per_class is not None:
            keep = _first_per_class(labels, limit_per_class)
            images, labels = images[keep], labels[keep]
        out[split] = (np.ascontiguousarray(images), labels)
    return out, classes


def _first_per_class(labels, limit):
    """Indices of the first `limit` samples of each class, in their original order."""
    keep = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:limit]] = True
    return np.flatnonzero(keep)


# --------------------------------------------------------------------------------------------
# Image trees


def _is_image_name(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _index_tree(files, dirs, where):
    """Find the train/<class>/<image> + test/<class>/<image> layout among relative posix paths.

    files: relative paths of regular files; dirs: relative paths of folders (may be partial).
    Returns (classes, {split: [(label, relpath), ...]}) with classes sorted and files sorted.
    """
    prefixes = {}
    for rel in files:
        parts = PurePosixPath(rel).parts
        if len(parts) >= 3 and parts[-3] in SPLITS:
            prefixes.setdefault(parts[:-3], set()).add(parts[-3])
    for rel in dirs:
        parts = PurePosixPath(rel).parts
        if len(parts) >= 2 and parts[-2] in SPLITS:
            prefixes.setdefault(parts[:-2], set()).add(parts[-2])
    found = [p for p, s in prefixes.items() if s == set(SPLITS)]
    if not found:
        partial = [("/".join(p) or ".", sorted(s)) for p, s in prefixes.items()]
        detail = f"; found only {partial}" if partial else ""
        raise DatasetError(f"{where}: not a CIFAR image tree: expected train/<class>/<image> and "
                           f"test/<class>/<image>{detail}")
    if len(found) > 1:
        raise DatasetError(f"{where}: several train/test trees found "
                           f"({sorted('/'.join(p) or '.' for p in found)}); point at one of them")
    prefix = found[0]
    n = len(prefix)
    per = {s: {} for s in SPLITS}
    for rel in dirs:
        parts = PurePosixPath(rel).parts
        if len(parts) == n + 2 and parts[:n] == prefix and parts[n] in SPLITS \
                and not parts[n + 1].startswith("."):
            per[parts[n]].setdefault(parts[n + 1], [])
    for rel in files:
        parts = PurePosixPath(rel).parts
        if len(parts) == n + 3 and parts[:n] == prefix and parts[n] in SPLITS \
                and not parts[n + 1].startswith(".") and _is_image_name(parts[n + 2]):
            per[parts[n]].setdefault(parts[n + 1], []).append(rel)
    train_c, test_c = set(per["train"]), set(per["test"])
    root = "/".join(prefix)
    root = f"{where}/{root}" if root else where
    if train_c != test_c:
        raise DatasetError(
            f"{root}: class folders differ between train/ and test/: only in train "
            f"{sorted(train_c - test_c)}, only in test {sorted(test_c - train_c)}")
    if not train_c:
        raise DatasetError(f"{root}: train/ and test/ hold no class folders")
    classes = tuple(sorted(train_c))
    for s in SPLITS:
        empty = [c for c in classes if not per[s][c]]
        if empty:
            raise DatasetError(f"{root}: class folders without images in {s}/: {empty}")
    items = {s: [(label, rel) for label, c in enumerate(classes) for rel in sorted(per[s][c])]
             for s in SPLITS}
    return classes, items


def _limit_items(items, limit_per_class):
    if limit_per_class is None:
        return items
    out, count = [], {}
    for label, rel in items:
        if count.get(label, 0) < limit_per_class:
            count[label] = count.get(label, 0) + 1
            out.append((label, rel))
    return out


def _decode_chunk(chunk, size):
    """Decode [(display_name, bytes or filesystem path)] to uint8 (n, H, W, 3). Runs in workers."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(chunk), size[1], size[0], 3), dtype=np.uint8)
    for i, (name, src) in enumerate(chunk):
        try:
            fh = open(src, "rb") if isinstance(src, str) else io.BytesIO(src)
            with fh, Image.open(fh) as im:
                if im.size != tuple(size):
                    raise DatasetError(f"{name}: image is {im.size[0]}x{im.size[1]}, expected "
                                       f"{size[0]}x{size[1]}")
                out[i] = np.asarray(im.convert("RGB"))
        except DatasetError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return out


def _default_workers(n):
    import multiprocessing

    if n < POOL_THRESHOLD or multiprocessing.current_process().daemon:
        return 0  # small job, or inside a daemon process (which may not have children)
    return max(0, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1), 8))


def _mp_context():
    """The start method for decode workers: NASPRUNE_DECODE_START_METHOD, else fork where the
    platform has it (as torch's DataLoader does: no re-import of the caller's script, no start-up
    cost; the workers only run Pillow and numpy), else the platform default."""
    import multiprocessing

    method = os.environ.get("NASPRUNE_DECODE_START_METHOD")
    if method is None and "fork" in multiprocessing.get_all_start_methods():
        method = "fork"
    return get_context(method)


def decode_images(entries, size=IMAGE_SIZE, workers=None, progress=None, desc="decoding"):
    """Decode [(display_name, bytes or path)] with Pillow into a uint8 array (n, H, W, 3).

    workers: processes to use (0: decode here); default: all cores (at most 8) for 4096 images or
    more, else 0. progress: a callback ``progress(done, total, desc)`` called as chunks finish
    (the command line draws its bar with it; the library draws none), or None.
    """
    n = len(entries)
    workers = _default_workers(n) if workers is None else int(workers)
    out = np.empty((n, size[1], size[0], 3), dtype=np.uint8)
    chunk = max(256, min(4096, -(-n // max(1, workers * 8))))
    bounds = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    done = 0

    def advance(k):
        nonlocal done
        done += k
        if progress is not None:
            progress(done, n, desc)

    if workers > 1 and len(bounds) > 1:
        try:
            with ProcessPoolExecutor(workers, mp_context=_mp_context()) as pool:
                futures = {pool.submit(_decode_chunk, entries[a:b], size): (a, b) for a, b in bounds}
                try:
                    for fut in as_completed(futures):
                        a, b = futures[fut]
                        out[a:b] = fut.result()
                        advance(b - a)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
            return out
        except (BrokenProcessPool, OSError, PermissionError) as e:
            warnings.warn(f"process pool unavailable ({e}); decoding in this process",
                          RuntimeWarning, stacklevel=2)
            done = 0
    for a, b in bounds:
        out[a:b] = _decode_chunk(entries[a:b], size)
        advance(b - a)
    return out


def _decode_tree(classes, items, resolve, limit_per_class, workers, progress, where):
    """items: {split: [(label, relpath)]}; resolve(relpath) -> bytes or filesystem path."""
    out = {}
    selected = {s: _limit_items(items[s], limit_per_class) for s in SPLITS}
    entries = [(f"{where}/{rel}", resolve(rel)) for s in SPLITS for _, rel in selected[s]]
    images = decode_images(entries, IMAGE_SIZE, workers, progress, desc=f"decoding {where}")
    start = 0
    for s in SPLITS:
        k = len(selected[s])
        labels = np.array([label for label, _ in selected[s]], dtype=np.int64)
        out[s] = (images[start:start + k], labels)
        start += k
    return out, classes


# --------------------------------------------------------------------------------------------
# Sources: detection, fingerprints for the cache key, and decoding


def _walk(root):
    """Relative posix paths of (files, dirs) under root, following no symlinked folders."""
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        dirs += [rel + d for d in dirnames]
        files += [rel + f for f in filenames]
    return files, dirs


class _Source:
    """A detected dataset source: kind, a fingerprint for the cache, and a decode method."""

    def __init__(self, path):
        self.path = path
        if path.is_dir():
            pickle_dir = self._find_pickle_dir(path)
            if pickle_dir is not None:
                self.kind, self.root = "pickle-dir", pickle_dir
            else:
                self.kind, self.root = "image-tree", path
                self.files, self.dirs = _walk(path)
                try:
                    _index_tree(self.files, self.dirs, str(path))  # validate early: clear error
                except DatasetError as e:
                    archives = sorted(f for f in self.files if "/" not in f
                                      and f.lower().endswith(TAR_SUFFIXES))
                    if archives:
                        raise DatasetError(f"{e}; the folder holds archive(s) {archives}: pass "
                                           f"the archive's path instead") from None
                    raise
        elif path.is_file():
            if not (self._is_tar(path) or path.name.lower().endswith(TAR_SUFFIXES)):
                raise DatasetError(
                    f"{path}: unknown dataset format: not a folder and not a tar archive; expected "
                    f"the cifar-10-batches-py folder, a train/<class>/ + test/<class>/ image tree, "
                    f"or a .tar/.tar.gz of either")
            self.kind, self.root = "tar", path
        else:
            raise DatasetError(f"{path}: neither a regular file nor a folder")

    @staticmethod
    def _find_pickle_dir(path):
        if (path / PICKLE_TRAIN[0]).is_file() or (path / PICKLE_TEST).is_file():
            return path
        if (path / "cifar-10-batches-py").is_dir():
            return path / "cifar-10-batches-py"
        return None

    @staticmethod
    def _is_tar(path):
        try:
            return tarfile.is_tarfile(path)
        except (OSError, EOFError, zlib.error, tarfile.TarError):
            return False

    def fingerprint(self):
        h = hashlib.sha256()
        h.update(f"{CACHE_VERSION}\0{self.kind}\0{self.root.resolve()}\0".encode())
        if self.kind == "pickle-dir":
            names = sorted(n for n in os.listdir(self.root)
                           if n in PICKLE_NAMES)
            stats = [(n, os.stat(self.root / n)) for n in names]
        elif self.kind == "image-tree":
            stats = [(rel, os.stat(self.root / rel)) for rel in sorted(self.files)]
        else:
            stats = [("", os.stat(self.root))]
        for name, st in stats:
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def decode(self, limit_per_class, workers, progress):
        where = str(self.path)
        if self.kind == "pickle-dir":
            blobs = {}
            for n in PICKLE_NAMES:
                if (self.root / n).is_file():
                    blobs[n] = (self.root / n).read_bytes()
            return _decode_pickles(blobs, str(self.root), limit_per_class)
        if self.kind == "image-tree":
            classes, items = _index_tree(self.files, self.dirs, where)
            return _decode_tree(classes, items, lambda rel: str(self.root / rel), limit_per_class,
                                workers, progress, where)
        return self._decode_tar(limit_per_class, workers, progress)

    def _decode_tar(self, limit_per_class, workers, progress):
        where = str(self.path)
        blobs, dirs = {}, []
        try:
            with tarfile.open(self.path, "r:*") as tf:
                for m in tf:
                    name = m.name.lstrip("/")
                    while name.startswith("./"):
                        name = name[2:]
                    if m.isdir():
                        dirs.append(name.rstrip("/"))
                    elif m.isfile():
                        base = PurePosixPath(name).name
                        if _is_image_name(base) or base in PICKLE_NAMES:
                            blobs[name] = tf.extractfile(m).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DatasetError(f"{where}: corrupt or truncated archive "
                               f"({type(e).__name__}: {e})") from e
        pickles = {}
        for name, data in blobs.items():
            base = PurePosixPath(name).name
            if base in PICKLE_NAMES:
                pickles.setdefault(str(PurePosixPath(name).parent), {})[base] = data
        pickle_dirs = [d for d, b in pickles.items() if PICKLE_TRAIN[0] in b]
        if len(pickle_dirs) == 1:
            d = pickle_dirs[0]
            return _decode_pickles(pickles[d], f"{where}:{d}", limit_per_class)
        if len(pickle_dirs) > 1:
            raise DatasetError(f"{where}: several pickle-batch folders in the archive: "
                               f"{sorted(pickle_dirs)}")
        files = [n for n in blobs if _is_image_name(PurePosixPath(n).name)]
        if not files:
            raise DatasetError(
                f"{where}: the archive holds neither CIFAR pickle batches nor images")
        classes, items = _index_tree(files, dirs, where)
        return _decode_tree(classes, items, blobs.__getitem__, limit_per_class, workers, progress,
                            where)


# --------------------------------------------------------------------------------------------
# Cache


def _slug(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "data"


def _cache_file(cache_dir, source, limit_per_class):
    key = hashlib.sha256(f"{source.fingerprint()}\0{limit_per_class}".encode()).hexdigest()[:20]
    return Path(cache_dir) / f"cifar10-{_slug(source.path.name)}-{key}.npz"


def _read_cache(file):
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y", "classes")}
        for s in SPLITS:
            x, y = arrays[f"{s}_x"], arrays[f"{s}_y"]
            if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"bad {s} arrays {x.dtype}{x.shape} {y.dtype}{y.shape}")
        return ({s: (arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in SPLITS},
                tuple(str(c) for c in arrays["classes"].tolist()))
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"{file}: unreadable cache ({type(e).__name__}: {e}); decoding again",
                      RuntimeWarning, stacklevel=3)
        return None


def _write_cache(file, splits, classes):
    from nasprune.io import atomic_write

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, train_x=splits["train"][0], train_y=splits["train"][1],
                     test_x=splits["test"][0], test_y=splits["test"][1],
                     classes=np.array(classes, dtype=str))
    atomic_write(file, write)


# --------------------------------------------------------------------------------------------
# Entry point


def load_cifar10(path, cache_dir=None, *, limit_per_class=None, workers=None, progress=None):
    """Load CIFAR-10 (or any 32x32 RGB dataset in the same layouts) as (train, test) ImageDatasets.

    path: the cifar-10-batches-py folder (or its parent), the official cifar-10-python.tar.gz,
        an image tree train/<class>/* + test/<class>/*, or a tar(.gz) of one.
    cache_dir: where the decoded arrays are cached; None: default_cache_dir(); False: no cache.
    limit_per_class: keep only the first this-many images of each class in each split (sorted
        file names; batch order for the pickles), for quick tests.
    workers: decoding processes (0: this process); default: all cores for large image sets.
    progress: a callback progress(done, total, desc) while decoding (see decode_images), or None.

    Each ImageDataset holds images uint8 (N, 32, 32, 3), labels int64 (N,), and the class names
    (folder names sorted, or batches.meta's label_names for the pickles).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: no such file or folder (expected CIFAR-10 pickle "
                                   f"batches, a train/ + test/ image tree, or a tar.gz of one)")
    if limit_per_class is not None and int(limit_per_class) < 1:
        raise ValueError(f"limit_per_class must be a positive integer, got {limit_per_class}")
    source = _Source(path)
    cached = file = None
    if cache_dir is not False:
        file = _cache_file(default_cache_dir() if cache_dir is None else cache_dir, source,
                           limit_per_class)
        cached = _read_cache(file)
    if cached is not None:
        splits, classes = cached
    else:
        splits, classes = source.decode(limit_per_class, workers, progress)
        if file is not None:
            try:
                _write_cache(file, splits, classes)
            except OSError as e:
                warnings.warn(f"{file}: cannot write the cache ({e}); continuing without",
                              RuntimeWarning, stacklevel=2)
    tag = _slug(path.name)
    return tuple(
        ImageDataset(splits[s][0], splits[s][1], classes, CIFAR10_MEAN, CIFAR10_STD, hflip=True,
                     name=f"{tag}:{s}")
        for s in SPLITS)
