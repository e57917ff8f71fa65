"""The convnet and the cnn_norms preset end to end, through the real `nrexp` CLI."""

import math

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nrexp
from conftest import read_summary, run_cli, run_dirs
from nrexp import config
from test_data import make_cifar10

LAYER_METRICS = ("act_norm", "grad_norm", "weight_norm", "weight_change", "update_ratio")
SMALL_CNN = [
    "model=cnn",
    "model.channels=[4,8]",
    "model.blocks_per_stage=1",
    "norm.groups=2",
    "data.batch_size=10",
    "trainer.max_steps=4",
    "trainer.log_every=2",
    "trainer.eval_every=2",
]


@pytest.mark.slow
def test_cnn_on_cifar10_files_end_to_end(tmp_path):
    """Real loading code on generated CIFAR-10 batches, augmentation on, every per-layer tag per block."""
    make_cifar10(tmp_path / "cifar")
    proc = run_cli(
        ["train", *SMALL_CNN, "norm=group", "data=cifar10", "data.source=local", f"data.root={tmp_path / 'cifar'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dirs(tmp_path / "outputs")[-1]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["data_source"] == "local" and summary["steps"] == 4
    assert summary["config"]["data"]["augment"] is True and summary["config"]["model"]["name"] == "cnn"
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    tags = set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])
    for metric in LAYER_METRICS:
        for layer in ("block00", "block01", "head"):
            assert f"{metric}/{layer}" in tags, f"{metric}/{layer}"


def test_cnn_norms_preset_composes_to_a_four_run_cifar10_sweep():
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=nrexp.config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=["+experiment=cnn_norms"], return_hydra_config=True)
    assert cfg.model.name == "cnn" and cfg.data.name == "cifar10" and cfg.data.augment is True
    assert cfg.hydra.sweeper.params.norm.split(",") == ["none", "batch", "layer", "group"]
    config.validate(cfg)
    GlobalHydra.instance().clear()
