"""Fashion-MNIST and CIFAR-10 from files in torchvision's on-disk format (generated here: no download),
their normalization, the one-line errors when they are missing, and the batched augmentation."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose
from nrexp import data as data_mod
from nrexp.data import DataError, TrainBatches, eval_batches, load_dataset, random_crop_flip

CPU = torch.device("cpu")


def write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format: magic (0, 0, type 0x08 = uint8, ndim), big-endian sizes, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, n_train: int = 64, n_test: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    raw = root / "FashionMNIST" / "raw"
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


def make_cifar10(root: Path, per_batch: int = 10, seed: int = 0):
    """CIFAR-10's python version: pickled dicts with `data` (N x 3072 uint8: 1024 R, 1024 G, 1024 B,
    each 32 x 32 row-major) and `labels`, in data_batch_1..5 and test_batch, plus batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "filenames": [f"{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    meta = {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_cases_per_batch": per_batch,
        "num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return batches


def data_cfg(tmp_path, *overrides):
    return compose([f"data.root={tmp_path}", "data.batch_size=8", *overrides]).data


def test_fashion_mnist_from_idx_files(tmp_path):
    arrays = make_fashion_mnist(tmp_path)
    ds = load_dataset(data_cfg(tmp_path, "data=fashion_mnist", "data.source=local"), CPU)
    assert ds.name == "fashion_mnist" and ds.source == "local" and ds.input_shape == (1, 28, 28)
    images, labels = arrays["train"]
    expected = (torch.from_numpy(images).float() / 255 - 0.2860) / 0.3530  # Fashion-MNIST's own constants
    assert torch.allclose(ds.train_x[:, 0], expected, atol=1e-5)
    assert torch.equal(ds.train_y, torch.from_numpy(labels).long())
    assert ds.test_x.shape == (16, 1, 28, 28) and ds.test_y.dtype == torch.int64


def test_cifar10_from_pickle_batches(tmp_path):
    batches = make_cifar10(tmp_path)
    ds = load_dataset(data_cfg(tmp_path, "data=cifar10", "data.source=local"), CPU)
    assert ds.name == "cifar10" and ds.input_shape == (3, 32, 32)
    assert len(ds.train_x) == 50 and len(ds.test_x) == 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    # example 13 is the 4th of data_batch_2; channel c, row r, column k sits at c*1024 + r*32 + k
    row = batches["data_batch_2"]["data"][3]
    for c, r, k in ((0, 0, 0), (1, 5, 7), (2, 31, 30)):
        expected = (row[c * 1024 + r * 32 + k] / 255 - mean[c]) / std[c]
        assert ds.train_x[13, c, r, k].item() == pytest.approx(expected, abs=1e-5)
    assert ds.train_y[13].item() == batches["data_batch_2"]["labels"][3]
    assert ds.test_y.tolist() == batches["test_batch"]["labels"]
    # per-channel normalization with the full set's constants, not this sample's
    assert torch.allclose(
        ds.train_x.mean(dim=(0, 2, 3)),
        (torch.tensor([127.5 / 255] * 3) - torch.tensor(mean)) / torch.tensor(std),
        atol=0.02,
    )
    # train_size keeps the first N
    assert (
        len(load_dataset(data_cfg(tmp_path, "data=cifar10", "data.source=local", "data.train_size=20"), CPU).train_x)
        == 20
    )


@pytest.mark.parametrize("name,folder", [("fashion_mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_files_are_one_clear_line(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        load_dataset(data_cfg(tmp_path, f"data={name}", "data.source=local"), CPU)
    message = str(err.value)
    assert "\n" not in message and f"no {'CIFAR-10' if name == 'cifar10' else 'Fashion-MNIST'} files under" in message
    assert str(tmp_path / folder) in message and "data=mnist" in message


def test_auto_without_files_or_network_has_no_bundled_fallback(tmp_path, monkeypatch):
    def offline(root):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(data_mod, "_download_cifar10", offline)
    with pytest.raises(DataError) as err:
        load_dataset(data_cfg(tmp_path, "data=cifar10", "data.source=auto"), CPU)
    message = str(err.value)
    assert message.startswith("data.source=auto: CIFAR-10 is not under") and "\n" not in message
    assert "OSError" in message and "only MNIST has a bundled fallback" in message
    assert "data.source=local" in message and "data=mnist" in message


def test_corrupt_cifar_batch_is_one_clear_line(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="unreadable or corrupt"):
        load_dataset(data_cfg(tmp_path, "data=cifar10", "data.source=local"), CPU)


def test_augment_defaults():
    assert compose(["data=cifar10"]).data.augment is True
    assert compose(["data=fashion_mnist"]).data.augment is False
    assert compose([]).data.augment is False


def test_random_crop_flip_matches_a_per_image_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=gen)
    dy, dx = torch.randint(0, 9, (16,), generator=gen), torch.randint(0, 9, (16,), generator=gen)
    flip = torch.arange(16) % 2 == 0
    out = random_crop_flip(x, dy, dx, flip, pad=4)
    for i in range(16):  # the slow, obvious way: pad one image, crop, maybe mirror
        padded = F.pad(x[i : i + 1], (4, 4, 4, 4), mode="reflect")[0]
        crop = padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop), i
    centred = random_crop_flip(x, torch.full((16,), 4), torch.full((16,), 4), torch.zeros(16, dtype=torch.bool))
    assert torch.equal(centred, x)  # offset (pad, pad) without a flip is the identity


def test_training_batches_are_augmented_reproducibly_and_eval_batches_never():
    x = torch.randn(40, 3, 8, 8)
    y = torch.arange(40)
    plain = TrainBatches(x, y, batch_size=8, seed=3)
    augmented = TrainBatches(x, y, batch_size=8, seed=3, augment=True)
    for (xp, yp), (xa, ya) in zip(plain.epoch(0), augmented.epoch(0)):
        assert torch.equal(yp, ya)  # same order and labels: only the images move
        assert torch.equal(xp, x[yp])  # augment=false gathers the examples as they are
        assert xa.shape == xp.shape and not torch.equal(xa, xp)
    # a pure function of (seed, epoch, step): again equal, resumable mid-epoch, new draws next epoch
    first = [b[0] for b in augmented.epoch(0)]
    assert all(torch.equal(a, b[0]) for a, b in zip(first, TrainBatches(x, y, 8, 3, augment=True).epoch(0)))
    assert all(torch.equal(a, b[0]) for a, b in zip(first[2:], augmented.epoch(0, start_step=2)))
    dy0, dx0, _ = augmented.augmentation(0)
    dy1, dx1, _ = augmented.augmentation(1)
    assert not (torch.equal(dy0, dy1) and torch.equal(dx0, dx1))
    assert int(dy0.min()) >= 0 and int(dy0.max()) <= 8
    # evaluation batches are the stored tensors, untouched
    assert all(torch.equal(xb, x[i * 10 : (i + 1) * 10]) for i, (xb, _) in enumerate(eval_batches(x, y, 10)))


def test_auto_falls_back_to_the_bundled_mnist_sample_saying_why_in_one_warning(tmp_path, monkeypatch, caplog):
    def offline(name, root, download=False):
        if download:
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
        return read_idx(name, root, download)

    read_idx = data_mod._read_idx
    monkeypatch.setattr(data_mod, "_read_idx", offline)
    data_mod._CACHE.clear()
    with caplog.at_level("WARNING", logger="nrexp"):
        ds = load_dataset(data_cfg(tmp_path, "data=mnist", "data.source=auto"), CPU)
    assert ds.source == "bundled" and len(ds.train_x) == 4000
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"MNIST is not under {tmp_path} and could not be downloaded (OSError: <urlopen error")
    assert "data.source=download" not in warning  # the user asked for auto (it once named the download's own error)
    assert "Set data.source=bundled to silence this" in warning
