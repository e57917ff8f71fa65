"""Datasets as normalized tensors on the training device, and minibatches as index gathers.

Datasets of this size fit in memory (MNIST is 47 MB as uint8), so we load them once, normalize
once, and move them to the device: a training batch is then `x[perm[i:i + B]]`, with no DataLoader,
no PIL and no per-sample Python (the trick of airbench's loader). This is what makes small runs fast.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
import torch

from nrexp.config import ConfigError, validate_data_size

log = logging.getLogger(__name__)

BUNDLED_MNIST = Path(__file__).parent / "assets" / "mnist_sample.npz"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the full 60k training set; used for every source


class DataError(ConfigError):
    """The data could not be found, fetched or read: one clear line, exit code 2."""


@dataclass
class Dataset:
    """A classification dataset, already normalized and on its device."""

    name: str
    source: str  # where it came from: "local", "download" or "bundled"
    train_x: torch.Tensor  # (N, C, H, W) float32
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = 10

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def _mnist_from_torchvision(root: Path, download: bool) -> Tuple[torch.Tensor, ...]:
    from torchvision.datasets import MNIST  # imported here: torchvision is slow to import

    splits = []
    for train in (True, False):
        ds = MNIST(str(root), train=train, download=download)
        splits += [ds.data, ds.targets]  # uint8 (N, 28, 28) and int64: no PIL, no transforms
    return tuple(splits)


def _mnist_local(root: Path) -> Tuple[torch.Tensor, ...]:
    try:
        return _mnist_from_torchvision(root, download=False)
    except RuntimeError as err:
        if "not found" in str(err).lower():
            raise DataError(
                f"data.source=local: no MNIST files under {root / 'MNIST' / 'raw'}. Fix: put the four "
                "MNIST idx files there, set data.root=<dir> (or NREXP_DATA_ROOT), or use data.source=bundled"
            ) from None
        raise DataError(f"data.source=local: could not read MNIST under {root}: {err}. Fix: delete "
                        f"{root / 'MNIST'} and download again, or use data.source=bundled") from None
    except (ValueError, EOFError, OSError) as err:
        raise DataError(f"data.source=local: MNIST files under {root} are corrupt ({err}). Fix: delete "
                        f"{root / 'MNIST'} and download again, or use data.source=bundled") from None


def _mnist_download(root: Path) -> Tuple[torch.Tensor, ...]:
    try:
        return _mnist_from_torchvision(root, download=True)
    except (RuntimeError, OSError) as err:  # URLError is an OSError; torchvision raises RuntimeError too
        raise DataError(
            f"data.source=download: could not download MNIST to {root} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no network?'}). Fix: connect to the internet, "
            "copy the files to data.root, or use data.source=bundled"
        ) from None


def _mnist_bundled() -> Tuple[torch.Tensor, ...]:
    with np.load(BUNDLED_MNIST) as z:
        return tuple(torch.from_numpy(z[k]).long() if k.startswith("y") else torch.from_numpy(z[k])
                     for k in ("x_train", "y_train", "x_test", "y_test"))


def _locate_mnist(source: str, root: Path) -> Tuple[str, Tuple[torch.Tensor, ...]]:
    """Return (source actually used, raw uint8 tensors). `auto` tries local, download, bundled."""
    if source == "local":
        return "local", _mnist_local(root)
    if source == "download":
        return "download", _mnist_download(root)
    if source == "bundled":
        return "bundled", _mnist_bundled()
    try:
        return "local", _mnist_local(root)
    except DataError:
        pass
    try:
        return "download", _mnist_download(root)
    except DataError as err:
        log.warning("MNIST is not under %s and could not be downloaded (%s); using the bundled sample of "
                    "5,000 real digits (4,000 train / 1,000 test) instead. Numbers will differ from full "
                    "MNIST. Set data.source=bundled to silence this.", root, str(err).split(" (")[0])
        return "bundled", _mnist_bundled()


# The last dataset loaded in this process, keyed by what determines it. Jobs of a Hydra sweep under the
# basic launcher run one after another in one process; they share this instead of each reading,
# normalizing and copying the data again. One entry only, so memory never grows; training never
# writes into these tensors.
_CACHE: dict = {}


def load_dataset(data_cfg, device: torch.device) -> Dataset:
    """Load `data_cfg.name`, normalize it once, keep the first `train_size` examples, move to device.

    A second call with the same (name, source, root, train_size, device) in the same
    process returns the cached Dataset.
    """
    root = Path(str(data_cfg.root)).expanduser()
    source = getattr(data_cfg.source, "value", data_cfg.source)
    key = (data_cfg.name, source, str(root), data_cfg.train_size, str(device))
    cached = _CACHE.get(key)
    if cached is not None:
        validate_data_size(data_cfg, cached[1])
        if source == "auto" and cached[0].source == "bundled":
            log.warning("MNIST not found under %s; using the bundled 5,000-digit sample (as the previous run "
                        "in this process did). Set data.source=bundled to silence this.", root)
        return cached[0]
    dataset, n_available = _load_dataset(data_cfg, device, root, source)
    _CACHE.clear()
    _CACHE[key] = (dataset, n_available)
    return dataset


def _load_dataset(data_cfg, device: torch.device, root: Path, source: str) -> Tuple[Dataset, int]:
    used, (train_x, train_y, test_x, test_y) = _locate_mnist(source, root)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device=device, dtype=torch.float32).div_(255.0).unsqueeze(1)  # (N, 1, 28, 28)
        return x.sub_(MNIST_MEAN).div_(MNIST_STD)

    n_available = len(train_x)
    validate_data_size(data_cfg, n_available)
    if data_cfg.train_size is not None:
        train_x, train_y = train_x[: data_cfg.train_size], train_y[: data_cfg.train_size]
    return Dataset(name="mnist", source=used, train_x=prepare(train_x), train_y=train_y.to(device),
                   test_x=prepare(test_x), test_y=test_y.to(device)), n_available


class TrainBatches:
    """Shuffled training minibatches gathered on the device.

    Each epoch's order is a `torch.randperm` drawn from a generator seeded by (seed, epoch), so any
    epoch's order can be recomputed exactly (used to resume mid-epoch) without storing RNG state.
    The last partial batch is dropped: every step sees `batch_size` examples, which keeps BatchNorm
    statistics comparable across steps and never produces a batch of one.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.steps_per_epoch = len(x) // batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator(device=self.x.device).manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.x), device=self.x.device, generator=gen)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        perm = self.permutation(epoch)
        for i in range(start_step, self.steps_per_epoch):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]
