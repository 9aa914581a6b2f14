"""Offline image data for the supernet: sklearn digits, CIFAR-10 python batches, image folders.

Every loader returns the same `Dataset` (float32 NCHW, per-channel standardised with training
statistics, seeded train/validation split); a spec string `digits|cifar10:PATH|folder:PATH` picks one.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nasc.errors import NascError
from nasc.search.nas import defaults as D

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".npy")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_SIDE = 32


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: np.ndarray  # (N, 3, R, R) float32
    train_y: np.ndarray  # (N,) int64
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int

    @property
    def resolution(self) -> int:
        return int(self.train_x.shape[-1])


def resize(images: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) float images to side x side (align_corners=False)."""
    n, c, h, w = images.shape
    if (h, w) == (side, side):
        return images.astype(np.float32)

    def axis(src: int):
        pos = np.clip((np.arange(side) + 0.5) * src / side - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = axis(h), axis(w)
    rows = images[:, :, y0, :] * (1 - fy)[:, None] + images[:, :, y1, :] * fy[:, None]
    return (rows[..., x0] * (1 - fx) + rows[..., x1] * fx).astype(np.float32)


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    """Seeded stratified split: the same fraction of every class goes to validation."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        val[idx[: max(1, int(round(len(idx) * val_fraction)))]] = True
    return x[~val], y[~val], x[val], y[val]


def _finish(name, train_x, train_y, val_x, val_y, num_classes) -> Dataset:
    mean = train_x.mean(axis=(0, 2, 3), keepdims=True)
    std = train_x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    norm = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return Dataset(
        name, norm(train_x), train_y.astype(np.int64), norm(val_x), val_y.astype(np.int64), int(num_classes)
    )


def load_digits(resolution: int = D.DEFAULT_RESOLUTION, val_fraction: float = D.DEFAULT_VAL_FRACTION, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1,797 images), upsampled and repeated to 3 channels."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    x = np.repeat(resize(x, resolution), 3, axis=1)
    return _finish("digits", *_split(x, d.target, val_fraction, seed), 10)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise NascError(f"{path}: not a CIFAR-10 python batch ({e})") from None


def load_cifar10(
    path: str | Path,
    resolution: int = CIFAR_SIDE,
    val_fraction: float = D.DEFAULT_VAL_FRACTION,
    seed: int = 0,
    max_train: int | None = None,
) -> Dataset:
    """CIFAR-10 python batches (`data_batch_1..5`); validation is a seeded split of the training
    batches, never `test_batch`, so the search does not select on test data."""
    root = Path(path)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = [root / f for f in CIFAR_TRAIN_BATCHES if (root / f).exists()]
    if not files:
        raise NascError(f"{root}: no CIFAR-10 python batches (expected data_batch_1 .. data_batch_5)")
    xs, ys = [], []
    for f in files:
        d = _unpickle(f)
        if b"data" not in d or b"labels" not in d:
            raise NascError(f"{f}: CIFAR-10 batch without b'data'/b'labels'")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if max_train is not None and len(y) > max_train:
        keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:max_train])
        x, y = x[keep], y[keep]
    x = resize(x.astype(np.float32) / 255.0, resolution)
    return _finish("cifar10", *_split(x, y, val_fraction, seed), 10)


def _read_image(path: Path, side: int) -> np.ndarray:
    """(3, side, side) float32 in [0, 1]; PIL when installed, else .npy and binary PPM/PGM."""
    if path.suffix == ".npy":
        a = np.load(path).astype(np.float32)
        a = a / 255.0 if a.max() > 1.0 else a
    else:
        try:
            from PIL import Image

            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except ImportError:
            a = _read_pnm(path)
        except OSError as e:
            raise NascError(f"{path}: unreadable image ({e})") from None
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise NascError(f"{path}: expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {a.shape}")
    a = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[..., :3]
    return resize(a.transpose(2, 0, 1)[None], side)[0]


def _read_pnm(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    parts = raw.split(maxsplit=4)
    if len(parts) < 5 or parts[0] not in (b"P5", b"P6"):
        raise NascError(f"{path}: without Pillow only .npy and binary .ppm/.pgm images can be read")
    w, h, maxval = int(parts[1]), int(parts[2]), int(parts[3])
    ch = 3 if parts[0] == b"P6" else 1
    a = np.frombuffer(parts[4][: w * h * ch], dtype=np.uint8).reshape(h, w, ch)
    return a.astype(np.float32) / maxval


def _read_folder(root: Path, classes: list[str], side: int):
    xs, ys = [], []
    for label, cls in enumerate(classes):
        d = root / cls
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
        if not files:
            raise NascError(f"{d}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        xs += [_read_image(p, side) for p in files]
        ys += [label] * len(files)
    return np.stack(xs), np.asarray(ys)


def load_folder(
    path: str | Path, resolution: int = D.DEFAULT_RESOLUTION, val_fraction: float = D.DEFAULT_VAL_FRACTION, seed: int = 0
) -> Dataset:
    """ImageFolder layout: PATH/<class>/<image>, or PATH/train/<class>/ and PATH/val/<class>/."""
    root = Path(path)
    if not root.is_dir():
        raise NascError(f"{root}: image folder not found")
    has_split = (root / "train").is_dir() and (root / "val").is_dir()
    base = root / "train" if has_split else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise NascError(f"{base}: need at least two class sub-folders, found {classes}")
    if has_split:
        tx, ty = _read_folder(root / "train", classes, resolution)
        vx, vy = _read_folder(root / "val", classes, resolution)
        return _finish("folder", tx, ty, vx, vy, len(classes))
    x, y = _read_folder(root, classes, resolution)
    return _finish("folder", *_split(x, y, val_fraction, seed), len(classes))


def load_data(spec: str, resolution: int | None = None, seed: int = 0, max_train: int | None = None) -> Dataset:
    """Dataset named by `digits`, `cifar10:PATH` or `folder:PATH`."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return load_digits(resolution or D.DEFAULT_RESOLUTION, seed=seed)
    if kind == "cifar10" and path:
        return load_cifar10(path, resolution or CIFAR_SIDE, seed=seed, max_train=max_train)
    if kind == "folder" and path:
        return load_folder(path, resolution or D.DEFAULT_RESOLUTION, seed=seed)
    raise NascError(f"data spec {spec!r}: expected digits, cifar10:PATH or folder:PATH")
