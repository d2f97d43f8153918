"""Fashion-MNIST from local IDX files (Debian package ``dataset-fashion-mnist`` or a user folder).

Nothing is downloaded: the files must already be on disk.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the IDX files: ``root``, ``$GANFORGE_FASHION_MNIST_DIR``, or the Debian package's."""
    candidates = [Path(p) for p in (root, os.environ.get("GANFORGE_FASHION_MNIST_DIR")) if p] + [DEBIAN_DIR]
    for d in candidates:
        if (d / (_FILES["train"][0] + ".gz")).exists() or (d / _FILES["train"][0]).exists():
            return d
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {', '.join(map(str, candidates))}; "
        "install them with `apt-get install -y dataset-fashion-mnist` or set GANFORGE_FASHION_MNIST_DIR"
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _file(d: Path, name: str) -> Path:
    return d / (name + ".gz") if (d / (name + ".gz")).exists() else d / name


def load(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×28×28, labels int64 N) for ``split`` in {'train', 'test'}."""
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: train, test")
    d = find_dir(root)
    img_name, lbl_name = _FILES[split]
    images = _read_idx(_file(d, img_name))
    labels = _read_idx(_file(d, lbl_name)).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """28×28 → 32×32 by a 2-pixel black border, the usual way to give Fashion-MNIST a power-of-two size."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))
