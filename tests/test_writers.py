"""TensorBoardWriter's events, read back with TensorBoard's own reader."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nrexp.writers import TensorBoardWriter

LAYERS = ["block00", "block01", "head"]


def stats(offset: float, layers=LAYERS):
    return {
        metric: {layer: offset + 10 * m + i for i, layer in enumerate(layers)}
        for m, metric in enumerate(("act_norm", "grad_norm", "update_ratio"))
    }


def test_layer_stats_are_read_back_as_written_at_every_step(tmp_path):
    """layer_stats fills one reused Summary per set of metrics: each step's event must still carry that
    step's values (not the last ones written), a different set of metrics its own tags, and stats of
    some layers only (not the run's layer list) their own tags too."""
    writer = TensorBoardWriter(tmp_path, LAYERS)
    for step in range(3):
        writer.layer_stats(step, stats(0.5 * step))
    writer.layer_stats(3, {"weight_norm": {layer: 7.0 + i for i, layer in enumerate(LAYERS)}})
    writer.layer_stats(4, stats(100.0, layers=["head", "block00"]))  # other layers, other order
    writer.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    for m, metric in enumerate(("act_norm", "grad_norm", "update_ratio")):
        for i, layer in enumerate(LAYERS):
            got = [(e.step, e.value) for e in events.Scalars(f"{metric}/{layer}")]
            expected = [(step, 0.5 * step + 10 * m + i) for step in range(3)]
            if layer == "head":
                expected.append((4, 100.0 + 10 * m))
            if layer == "block00":
                expected.append((4, 100.0 + 10 * m + 1))
            assert got == [(s, pytest.approx(v)) for s, v in expected], (metric, layer)
    assert [(e.step, e.value) for e in events.Scalars("weight_norm/head")] == [(3, 9.0)]


def depth_stats(layers):
    return {
        metric: {layer: (m + 1) * 10.0**i for i, layer in enumerate(layers)}
        for m, metric in enumerate(("act_norm", "grad_norm", "weight_norm", "weight_change", "update_ratio", "act_cos"))
    }


def test_depth_profiles_are_scalars_whose_step_is_the_layer_index(tmp_path):
    layers = [f"block{i:02d}" for i in range(4)] + ["head"]
    writer = TensorBoardWriter(tmp_path, layers)
    writer.depth_plot(0, depth_stats(layers), "init")
    writer.depth_plot(4, depth_stats(layers), "latest")  # an image only
    final = {m: {k: 2 * v for k, v in per.items()} for m, per in depth_stats(layers).items()}
    writer.depth_plot(8, final, "final")
    writer.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    assert {t for t in tags if t.startswith("depth_")} == {
        "depth_init/act_norm",
        "depth_init/act_cos",
        "depth_init/grad_norm",
        "depth_init/weight_norm",
        "depth_init/update_ratio",
        "depth_final/act_norm",
        "depth_final/act_cos",
        "depth_final/grad_norm",
        "depth_final/weight_norm",
        "depth_final/weight_change",
    }  # no weight_change at init (nothing has changed yet), no update_ratio at the end (the probe takes no step)
    for when, stats in (("init", depth_stats(layers)), ("final", final)):
        got = [(e.step, e.value) for e in events.Scalars(f"depth_{when}/grad_norm")]
        assert got == [(i, pytest.approx(stats["grad_norm"][layer])) for i, layer in enumerate(layers)]
    assert set(events.Tags()["images"]) == {"depth/init", "depth/latest", "depth/final"}


def read_layout(run_dir):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
    (event,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


def test_the_layout_shows_depth_charts_then_first_middle_last_block_and_head(tmp_path):
    layers = [f"block{i:02d}" for i in range(10)] + ["head"]
    TensorBoardWriter(tmp_path, layers).close()
    layout = read_layout(tmp_path)
    titles = list(layout)
    assert titles[0].startswith("depth profile") and titles[-1] == "training"
    assert sorted(t for tags in layout[titles[0]].values() for t in tags) == sorted(
        f"^depth_{when}/{m}$" for m in ("act_norm", "grad_norm") for when in ("init", "final")
    )
    act = layout["act_norm: first, middle, last block and head (all runs)"]
    # one tag per chart: each chart overlays that layer of every run, not every layer of every run
    assert act == {
        "act_norm/block00 (first block)": ["^act_norm/block00$"],
        "act_norm/block05 (middle block)": ["^act_norm/block05$"],
        "act_norm/block09 (last block)": ["^act_norm/block09$"],
        "act_norm/head (head)": ["^act_norm/head$"],
    }
    assert len(titles) == 1 + 6 + 1  # depth, the six per-layer metrics, training


def hydra_job(sweep, name, task, job_overrides):
    """A run dir as a Hydra sweep job leaves it: multirun.yaml in the sweep dir, .hydra/ in the job's."""
    import yaml

    sweep.mkdir(exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "MULTIRUN"}}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(job_overrides))
    return job


def read_hparams(run_dir):
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    content = events.PluginTagToContent("hparams")
    data = {k.rsplit("/", 1)[1]: plugin_data_pb2.HParamsPluginData.FromString(v) for k, v in content.items()}
    final = {t: events.Scalars(t)[-1].value for t in events.Tags()["scalars"] if t.startswith("final/")}
    return (
        data["experiment"].experiment,
        data["session_start_info"].session_start_info,
        data["session_end_info"].session_end_info,
        final,
    )


def config(norm="batch", depth=3, scale=2.0, seed=1):
    return {
        "norm": {"name": norm},
        "model": {"name": "mlp", "depth": depth},
        "init": {"name": "normal", "scale": scale},
        "optim": {"lr": 0.1},
        "dropout": {"p": 0.0},
        "seed": seed,
    }


def test_hparams_are_the_swept_keys_and_a_documented_few_with_the_science_metrics(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    from nrexp.writers import ALWAYS_HPARAMS, HPARAM_METRICS, write_summary

    layers = ["block00", "block01", "block02", "head"]
    job = hydra_job(
        tmp_path / "sweep",
        "init.scale=2,norm=batch",
        ["model.depth=3", "init.scale=1,2", "norm=none,batch", "seed=0,1"],
        ["model.depth=3", "init.scale=2", "norm=batch", "seed=1"],
    )
    act = {
        "init": {"block00": 2.0, "block01": 20.0, "block02": 200.0, "head": 1.0},
        "final": {"block00": 4.0, "block01": 4.0, "block02": 0.4, "head": 9.0},
    }
    write_summary(
        job,
        {
            "status": "completed",
            "config": config(),
            "steps": 8,
            "metrics": {"train/acc": 0.75, "test/acc": 0.5, "train/loss": 1.0, "test/loss": 2.0},
            "layers": {when: {"act_norm": v} for when, v in act.items()},
        },
    )
    writer = TensorBoardWriter(job, layers)
    writer.hparams(8, {}, {})  # the numbers from the run's summary.json
    writer.close()

    experiment, start, end, final = read_hparams(job)
    assert ALWAYS_HPARAMS == ("norm", "model.depth", "seed")
    # the swept keys in the command line's order, then the few; only the swept ones marked as differing
    assert [(h.name, h.differs) for h in experiment.hparam_infos] == [
        ("init.scale", True),
        ("norm", True),
        ("model.depth", False),
        ("seed", True),
    ]
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    assert {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()} == {
        "init.scale": 2.0,
        "norm": "batch",
        "model.depth": 3,
        "seed": 1,
    }
    assert start.group_name == "init.scale=2.0,norm=batch,model.depth=3"  # the seeds of a setting: one row
    assert end.status == api_pb2.STATUS_SUCCESS
    assert final == pytest.approx(
        {
            "final/test_acc": 0.5,
            "final/train_acc": 0.75,
            "final/gen_gap": 0.25,
            "final/log10_act_ratio_init": 2.0,
            "final/log10_act_ratio_final": -1.0,
            "final/diverged": 0.0,
            "final/steps": 8.0,
        }
    )


def test_a_diverged_run_and_a_run_without_hydra(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    from nrexp.writers import DEFAULT_SWEPT, write_summary

    write_summary(
        tmp_path,
        {
            "status": "diverged",
            "config": config(),
            "steps": 5,
            "metrics": {"test/acc": None},
            "layers": {"init": {"act_norm": {"block00": 1.0, "block01": 10.0, "head": 1.0}}},
        },
    )
    writer = TensorBoardWriter(tmp_path, LAYERS)
    writer.hparams(5, {}, {})
    writer.close()
    experiment, _, end, final = read_hparams(tmp_path)
    assert [h.name for h in experiment.hparam_infos] == [*DEFAULT_SWEPT, "model.depth", "seed"]
    assert end.status == api_pb2.STATUS_FAILURE
    # unknown numbers are left out (an empty cell), diverged and steps are always there
    assert final == pytest.approx({"final/diverged": 1.0, "final/steps": 5.0, "final/log10_act_ratio_init": 1.0})


def test_a_run_resumed_before_step_L_keeps_its_depth_profile_at_init(tmp_path):
    """TensorBoard purges the steps >= the resumed step of every tag: the depth profile (steps 0..L) too. The
    resumed writer writes it again from the summary the interrupted attempt left."""
    from nrexp.writers import write_summary

    layers = [f"block{i:02d}" for i in range(4)] + ["head"]
    writer = TensorBoardWriter(tmp_path, layers)
    writer.depth_plot(0, depth_stats(layers), "init")
    writer.layer_stats(0, depth_stats(layers))
    writer.close()
    write_summary(tmp_path, {"status": "interrupted", "layers": {"init": depth_stats(layers)}})
    TensorBoardWriter(tmp_path, layers, purge_step=2).close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    got = [(e.step, e.value) for e in events.Scalars("depth_init/act_norm")]
    assert got == [(i, pytest.approx(depth_stats(layers)["act_norm"][layer])) for i, layer in enumerate(layers)]


def test_histograms_count_every_element_and_match_an_independent_histogram(tmp_path):
    """trainer.histograms=true: hist_act/<layer>, hist_grad/<layer>, hist_weight/<layer> at every logging step;
    each histogram's counts sum to the tensor's number of elements; the weights' at step 0 are numpy's
    histogram of the weights at init (the checkpoint's W_init), over the same bins; none without the knob."""
    import numpy as np
    import torch

    from conftest import TINY, compose
    from nrexp.train import train

    overrides = TINY + ["trainer.max_steps=4", "trainer.log_every=2", "trainer.progress=false"]
    train(compose(overrides + ["trainer.histograms=true"]), tmp_path / "on")
    train(compose(overrides), tmp_path / "off")
    events = EventAccumulator(str(tmp_path / "on"), size_guidance={"histograms": 0}).Reload()
    layers = ["block00", "block01", "head"]
    assert set(events.Tags()["histograms"]) == {
        f"{k}/{n}" for k in ("hist_act", "hist_grad", "hist_weight") for n in layers
    }
    batch, width, pixels = 64, 32, 28 * 28
    sizes = {
        "block00": (batch * width, width * pixels),
        "block01": (batch * width, width * width),
        "head": (batch * 10, 10 * width),
    }
    init = torch.load(tmp_path / "on" / "checkpoint.pt", weights_only=False)["init_weights"]
    for i, layer in enumerate(layers):
        act, weight = sizes[layer]
        for kind, numel in (("hist_act", act), ("hist_grad", weight), ("hist_weight", weight)):
            got = events.Histograms(f"{kind}/{layer}")
            assert [e.step for e in got] == [0, 2], (kind, layer)
            for e in got:
                h = e.histogram_value
                assert h.num == numel and sum(h.bucket) == numel and len(h.bucket) == 64, (kind, layer, e.step)
                assert h.min <= h.max
        h = events.Histograms(f"hist_weight/{layer}")[0].histogram_value
        w = init[i].numpy().astype(np.float64).ravel()
        assert (h.min, h.max) == (pytest.approx(w.min()), pytest.approx(w.max()))
        assert h.sum == pytest.approx(w.sum(), abs=1e-3) and h.sum_squares == pytest.approx((w**2).sum(), rel=1e-5)
        expected, _ = np.histogram(w, bins=64, range=(w.min(), w.max()))
        # a value on a bin edge may fall either side in float32: a few entries may move to a neighbour
        assert np.abs(np.array(h.bucket) - expected).sum() <= 4, layer
    off = EventAccumulator(str(tmp_path / "off"), size_guidance={"histograms": 0}).Reload()
    assert off.Tags()["histograms"] == []


def test_a_fused_members_histograms_are_its_solo_runs(tmp_path):
    """trainer.histograms in a fused group (nrexp/fused.py): each member writes its own, from its slices of the
    stacks, the histograms its solo run writes (same counts, bins and ranges up to float rounding)."""
    from conftest import TINY, compose
    from nrexp.fused import train_group
    from nrexp.train import train

    base = TINY + [
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "trainer.progress=false",
        "trainer.histograms=true",
        "optim.momentum=0",
    ]
    cfgs = [compose(base + [f"seed={seed}"]) for seed in (0, 1)]
    train_group(cfgs, [tmp_path / "f0", tmp_path / "f1"])
    train(cfgs[1], tmp_path / "solo1")
    fused, solo = (
        EventAccumulator(str(tmp_path / d), size_guidance={"histograms": 0}).Reload() for d in ("f1", "solo1")
    )
    assert set(fused.Tags()["histograms"]) == set(solo.Tags()["histograms"]) and len(solo.Tags()["histograms"]) == 9
    for tag in solo.Tags()["histograms"]:
        a, b = fused.Histograms(tag), solo.Histograms(tag)
        assert [e.step for e in a] == [e.step for e in b] == [0, 2], tag
        for x, y in zip(a, b):
            hx, hy = x.histogram_value, y.histogram_value
            assert hx.num == hy.num and (hx.min, hx.max) == (
                pytest.approx(hy.min, rel=1e-5, abs=1e-6),
                pytest.approx(hy.max, rel=1e-5, abs=1e-6),
            )
            assert sum(abs(p - q) for p, q in zip(hx.bucket, hy.bucket)) <= 4, (tag, x.step)  # an entry on a bin edge
