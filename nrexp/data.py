"""Datasets as normalized tensors on the training device, and minibatches as index gathers.

Datasets of this size fit in memory (MNIST is 47 MB as uint8, CIFAR-10 150 MB), so we load them once,
normalize once, and move them to the device: a training batch is then `x[perm[i:i + B]]`, with no
DataLoader, no PIL and no per-sample Python (the trick of airbench's loader). This is what makes small
runs fast. Augmentation (CIFAR-10's random crop and flip) is likewise one batched gather on the device.

Where the files come from (`data.source`):
- mnist, fashion_mnist: torchvision's MNIST / FashionMNIST classes read the idx files under
  `data.root/MNIST/raw` or `data.root/FashionMNIST/raw` (and download them there).
- cifar10: we read the python pickle batches under `data.root/cifar-10-batches-py` ourselves, in the
  same format torchvision reads. torchvision's CIFAR10 insists on the md5 of every batch file on each
  load, which costs a pass over 170 MB per run and refuses any other file with that layout; so
  torchvision is used only to *download* (where it checks the archive's md5 before extracting).
- Only MNIST has a bundled sample; `auto` falls back to it for MNIST alone. For the others, `auto` is
  local files, else download, else a one-line DataError saying what to do.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nrexp.config import BUNDLED_DATASETS, ConfigError, validate_data_size

log = logging.getLogger(__name__)

BUNDLED_MNIST = Path(__file__).parent / "assets" / "mnist_sample.npz"
# Per-channel mean and std of each full training set, in [0, 1] pixel units; used for every source,
# so that a subset or the bundled sample is normalized exactly like the full set.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
MNIST_MEAN, MNIST_STD = STATS["mnist"][0][0], STATS["mnist"][1][0]
# name -> (what people call it, where its files live under data.root, which files)
FILES = {
    "mnist": ("MNIST", "MNIST/raw", "the four MNIST idx files"),
    "fashion_mnist": (
        "Fashion-MNIST",
        "FashionMNIST/raw",
        "the four idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...)",
    ),
    "cifar10": ("CIFAR-10", "cifar-10-batches-py", "data_batch_1 ... data_batch_5 and test_batch"),
}
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILES = ["test_batch"]
AUGMENT_PAD = 4  # pixels of random translation each way (the standard CIFAR-10 recipe)

Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images, labels: train, test


class DataError(ConfigError):
    """The data could not be found, fetched or read: one clear line, exit code 2."""

    reason: str = ""  # the underlying cause, for messages that wrap this one


class _NotFound(Exception):
    """The dataset's files are not under data.root (the caller words the error)."""


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
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


# ---- readers: each returns raw uint8 images (N, H, W) or (N, C, H, W) and int64 labels


def _read_idx(name: str, root: Path, download: bool) -> Raw:
    """MNIST or Fashion-MNIST through torchvision (idx files; `download` fetches them first)."""
    from torchvision.datasets import MNIST, FashionMNIST  # imported here: torchvision is slow to import

    cls = {"mnist": MNIST, "fashion_mnist": FashionMNIST}[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:
            if "not found" in str(err).lower():
                raise _NotFound() from None
            raise
        splits += [ds.data, ds.targets]  # uint8 (N, 28, 28) and int64: no PIL, no transforms
    return tuple(splits)


def _read_cifar10(root: Path) -> Raw:
    """CIFAR-10's pickle batches: each a dict with `data` (N x 3072 uint8, channel-major) and `labels`."""
    folder = root / FILES["cifar10"][1]
    splits = []
    for files in (CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILES):
        if not all((folder / f).is_file() for f in files):
            raise _NotFound()
        images, labels = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")  # the dataset's own format (torchvision does the same)
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        splits += [torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)]
    return tuple(splits)


def _download_cifar10(root: Path) -> Raw:
    from torchvision.datasets import CIFAR10

    CIFAR10(str(root), train=True, download=True)  # fetch, check the archive's md5, extract
    return _read_cifar10(root)


def _read_bundled_mnist() -> Raw:
    with np.load(BUNDLED_MNIST) as z:
        return tuple(
            torch.from_numpy(z[k]).long() if k.startswith("y") else torch.from_numpy(z[k])
            for k in ("x_train", "y_train", "x_test", "y_test")
        )


# ---- locating: the source asked for, with errors that say what to do


def _local(name: str, root: Path) -> Raw:
    label, folder, files = FILES[name]
    fallback = "use data.source=bundled" if name in BUNDLED_DATASETS else "use data=mnist (bundled sample)"
    try:
        return _read_cifar10(root) if name == "cifar10" else _read_idx(name, root, download=False)
    except _NotFound:
        raise DataError(
            f"data.source=local: no {label} files under {root / folder}. Fix: put {files} there, set "
            f"data.root=<dir> (or NREXP_DATA_ROOT), use data.source=download (needs internet), or {fallback}"
        ) from None
    except (
        RuntimeError,
        ValueError,
        EOFError,
        OSError,
        KeyError,
        TypeError,
        AssertionError,
        pickle.UnpicklingError,
    ) as err:
        corrupt = DataError(
            f"data.source=local: {label} files under {root / folder} are unreadable or corrupt "
            f"({type(err).__name__}: {err}). Fix: delete {root / folder.split('/')[0]} and download "
            f"again, or {fallback}"
        )
        corrupt.corrupt = True
        raise corrupt from None


def _download(name: str, root: Path) -> Raw:
    label = FILES[name][0]
    fallback = "use data.source=bundled" if name in BUNDLED_DATASETS else "use data=mnist (bundled sample)"
    try:
        return _download_cifar10(root) if name == "cifar10" else _read_idx(name, root, download=True)
    except (RuntimeError, OSError, _NotFound) as err:  # URLError is an OSError; torchvision raises RuntimeError too
        reason = f"{type(err).__name__}: {str(err).splitlines()[0].rstrip(':') if str(err) else 'no network?'}"
        error = DataError(
            f"data.source=download: could not download {label} to {root} ({reason}). Fix: "
            f"connect to the internet, copy the files to data.root and use data.source=local, or {fallback}"
        )
        error.reason = reason
        raise error from None


def _locate(name: str, source: str, root: Path) -> tuple[str, Raw]:
    """Return (source actually used, raw tensors). `auto` tries local, download, then (MNIST only) bundled."""
    if source == "bundled":
        if name not in BUNDLED_DATASETS:  # config.validate() says this first
            raise DataError(f"data.source=bundled: there is no bundled {FILES[name][0]} sample. Fix: use data=mnist")
        return "bundled", _read_bundled_mnist()
    if source == "local":
        return "local", _local(name, root)
    if source == "download":
        return "download", _download(name, root)
    try:
        return "local", _local(name, root)
    except DataError as err:
        if getattr(err, "corrupt", False):  # files there but broken: say so (a download would read them too)
            raise DataError(str(err).replace("data.source=local:", "data.source=auto:", 1)) from None
    try:
        return "download", _download(name, root)
    except DataError as err:
        label, folder, files = FILES[name]
        if name not in BUNDLED_DATASETS:
            raise DataError(
                f"data.source=auto: {label} is not under {root / folder} and could not be downloaded "
                f"({err.reason}); only MNIST has a bundled fallback. Fix: put "
                f"{files} there and use data.source=local (data.root=<dir>), or use data=mnist"
            ) from None
        log.warning(
            "MNIST is not under %s and could not be downloaded (%s); using the bundled sample of "
            "5,000 real digits (4,000 train / 1,000 test) instead. Numbers will differ from full "
            "MNIST. Set data.source=bundled to silence this.",
            root,
            err.reason,
        )
        return "bundled", _read_bundled_mnist()


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
            log.warning(
                "MNIST not found under %s; using the bundled 5,000-digit sample (as the previous run "
                "in this process did). Set data.source=bundled to silence this.",
                root,
            )
        return cached[0]
    dataset, n_available = _load_dataset(data_cfg, device, root, source)
    _CACHE.clear()
    _CACHE[key] = (dataset, n_available)
    return dataset


def _load_dataset(data_cfg, device: torch.device, root: Path, source: str) -> tuple[Dataset, int]:
    name = data_cfg.name
    used, (train_x, train_y, test_x, test_y) = _locate(name, source, root)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in STATS[name])

    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device=device, dtype=torch.float32).div_(255.0)
        if x.ndim == 3:  # grey (N, H, W) -> (N, 1, H, W)
            x = x.unsqueeze(1)
        return x.sub_(mean).div_(std)

    n_available = len(train_x)
    validate_data_size(data_cfg, n_available)
    if data_cfg.train_size is not None:
        train_x, train_y = train_x[: data_cfg.train_size], train_y[: data_cfg.train_size]
    return Dataset(
        name=name,
        source=used,
        train_x=prepare(train_x),
        train_y=train_y.long().to(device),
        test_x=prepare(test_x),
        test_y=test_y.long().to(device),
    ), n_available


# ---- batches


def random_crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = AUGMENT_PAD
) -> torch.Tensor:
    """Image i: pad by `pad` (reflecting), take the H x W window at offset (dy[i], dx[i]) in [0, 2 pad],
    then mirror it left-right if flip[i]. The whole batch in one gather, no Python loop over images.

    Reflect padding as in airbench: the border pixels are plausible image content rather than a black
    frame the network never sees at test time (torchvision's RandomCrop pads black by default).
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # crop, then mirror the crop
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of one epoch's draws. Always on the CPU, whatever the training device: CUDA's
    generator would give another order for the same seed, so a run would not repeat its data order on
    another device, and a naive DataLoader(shuffle=True) (nrexp bench's arm a) could not match it."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch + (stream << 40))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor onto `device` without making the host wait for the GPU (pinned memory, non_blocking);
    a plain copy from pageable memory would synchronize, once an epoch."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


class TrainBatches:
    """Shuffled (and, with `augment`, randomly cropped and flipped) training minibatches on the device.

    Each epoch's order is a `torch.randperm` drawn from a CPU generator seeded by (seed, epoch), so any
    epoch's order can be recomputed exactly (used to resume mid-epoch) without storing RNG state.
    The augmentation offsets and flips of a whole epoch are drawn up front from a second generator
    seeded the same way, so they too are a pure function of (seed, epoch, step).
    The last partial batch is dropped: every step sees `batch_size` examples, which keeps BatchNorm
    statistics comparable across steps and never produces a batch of one.
    Evaluation batches (`eval_batches`) are never augmented.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, augment: bool = False):
        self.x, self.y, self.batch_size, self.seed, self.augment = x, y, batch_size, seed, augment
        self.steps_per_epoch = len(x) // batch_size

    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        return epoch_generator(self.seed, epoch, stream)

    def permutation(self, epoch: int) -> torch.Tensor:
        return to_device(torch.randperm(len(self.x), generator=self._generator(epoch, 0)), self.x.device)

    def augmentation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dy, dx, flip) for every slot of the epoch: offsets in [0, 2 pad], flips with probability 1/2."""
        gen, n = self._generator(epoch, 1), len(self.x)
        dy = torch.randint(0, 2 * AUGMENT_PAD + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * AUGMENT_PAD + 1, (n,), generator=gen)
        flip = torch.randint(0, 2, (n,), generator=gen).bool()
        return tuple(to_device(t, self.x.device) for t in (dy, dx, flip))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = self.permutation(epoch)
        shifts: tuple[torch.Tensor, ...] | None = self.augmentation(epoch) if self.augment else None
        for i in range(start_step, self.steps_per_epoch):
            slots = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = perm[slots]
            x = self.x[idx]
            if shifts is not None:
                x = random_crop_flip(x, *(s[slots] for s in shifts))
            yield x, self.y[idx]


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]
