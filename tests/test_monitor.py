"""The monitor's numbers against an independent computation on the same batch."""

import torch
import torch.nn.functional as F

from conftest import TINY, compose
from nrexp.models import build_model
from nrexp.monitor import LayerMonitor
from nrexp.optim import build_optimizer


def test_monitor_matches_plain_forward_and_grad():
    torch.manual_seed(0)
    cfg = compose(["model.depth=3", "model.width=40", "norm=batch", "optim.momentum=0"])
    model = build_model(cfg, (1, 28, 28), 10)
    opt = build_optimizer(model, cfg.optim)
    monitor = LayerMonitor(model.monitored_layers())
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))

    activations = steps_then_backward(model, opt, x, y, steps=3)  # a few steps first: weight_change is not zero
    stats = monitor.before_step(activations)
    # independent: a plain forward pass through the blocks, layer by layer
    h = x.flatten(1)
    expected_act, expected_cos = {}, {}
    for name, block in model.blocks.items():
        h = block.dropout(block.act(block.norm(block.linear(h))))
        expected_act[name] = h.norm(dim=1).mean().item()
        expected_cos[name] = pairwise_cosine_loop(h)
    expected_act["head"] = model.head(h).norm(dim=1).mean().item()
    expected_cos["head"] = pairwise_cosine_loop(model.head(h))

    weights_before = [layer.weight.detach().clone() for layer in model.monitored_layers().values()]
    opt.step()
    stats = monitor.after_step(stats)
    host, scalars = monitor.to_host(stats, {"train/loss": torch.tensor(1.5)})
    assert scalars == {"train/loss": 1.5}

    for i, (name, layer) in enumerate(model.monitored_layers().items()):
        w = layer.weight.detach()
        assert host["act_norm"][name] == pytest_approx(expected_act[name])
        assert host["act_cos"][name] == pytest_approx(expected_cos[name])
        assert host["grad_norm"][name] == pytest_approx(layer.weight.grad.norm().item())
        assert host["weight_norm"][name] == pytest_approx(weights_before[i].norm().item())
        init = monitor.init_weights[i]
        assert host["weight_change"][name] == pytest_approx(((weights_before[i] - init).norm() / init.norm()).item())
        assert host["weight_change"][name] > 0
        before = weights_before[i]
        assert host["update_ratio"][name] == pytest_approx(((w - before).norm() / before.norm()).item())


def test_activation_norms_keep_layer_order_across_interleaved_shapes_and_dtypes():
    """One value per activation in the order given: each example's L2 norm over all its values, averaged
    over the batch, in float32 (conv maps flattened, bf16 upcast)."""
    from nrexp.monitor import activation_norms

    torch.manual_seed(0)
    activations = [
        torch.randn(8, 5),
        torch.randn(8, 3, 2, 2),
        torch.randn(8, 5) * 3,
        torch.randn(8, 7),
        torch.randn(8, 3, 2, 2).bfloat16(),
        torch.randn(8, 3, 2, 2) * 0.1,
    ]
    expected = torch.stack([a.flatten(1).float().norm(dim=1).mean() for a in activations])
    got = activation_norms(activations)
    assert got.dtype == torch.float32 and got.shape == (6,)
    assert torch.allclose(got, expected, rtol=1e-6), (got, expected)


def pairwise_cosine_loop(a: torch.Tensor) -> float:
    """The mean cosine similarity over the ordered pairs i != j of a's examples (each flattened), pair by
    pair in float64: the independent computation of act_cos (an all-zero example has cosine 0)."""
    rows = a.detach().flatten(1).double()
    total, pairs = 0.0, 0
    for i in range(len(rows)):
        for j in range(len(rows)):
            if i != j:
                total += F.cosine_similarity(rows[i], rows[j], dim=0, eps=1e-300).item()
                pairs += 1
    return total / pairs


def test_act_cos_is_the_mean_pairwise_cosine_of_an_explicit_loop():
    """act_cos against pair-by-pair cosines, for a dense map, a conv map, bf16, a batch collapsed onto one
    direction (1), one with opposite examples (-1/(B-1)) and one with an all-zero example; stacked
    (fused groups: (M, B, ...)) equal to each member's own."""
    from nrexp.monitor import activation_norms_and_cosines, stacked_activation_cosines

    torch.manual_seed(0)
    direction = torch.randn(1, 30)
    with_zero = torch.relu(torch.randn(9, 12) + 0.5)
    with_zero[3] = 0
    activations = [
        torch.randn(16, 30) + 2.0,
        torch.relu(torch.randn(8, 3, 4, 4)),
        (torch.randn(8, 20) + 1).bfloat16(),
        direction * torch.rand(6, 1) + 0 * torch.randn(6, 30),
        torch.cat([direction, -direction]),
        with_zero,
    ]
    norms, cosines = activation_norms_and_cosines(activations)
    assert cosines.dtype == torch.float32 and cosines.shape == (6,)
    expected = [pairwise_cosine_loop(a.float()) for a in activations]
    assert cosines.tolist() == [pytest_approx(e) for e in expected]
    assert expected[3] == pytest_approx(1.0) and expected[4] == pytest_approx(-1.0)
    assert 0.3 < expected[0] < 1 and 0 < expected[5] < 1
    assert torch.allclose(norms, torch.stack([a.flatten(1).float().norm(dim=1).mean() for a in activations]))
    assert torch.isnan(activation_norms_and_cosines([torch.randn(1, 5)])[1]).all()  # one example: no pairs
    # one batch size (the trainer's case: the layers' row norms handled together), a zero row and bf16 among them
    same = [with_zero, torch.relu(torch.randn(9, 2, 3, 3)), (torch.randn(9, 7) + 1).bfloat16(), -with_zero]
    assert activation_norms_and_cosines(same)[1].tolist() == [
        pytest_approx(pairwise_cosine_loop(a.float())) for a in same
    ]

    stacked = [torch.randn(3, 8, 5) + 1, torch.relu(torch.randn(3, 8, 2, 3, 3))]
    got = stacked_activation_cosines(stacked)
    assert got.shape == (2, 3)
    for layer, a in enumerate(stacked):
        for member in range(3):
            assert got[layer, member].item() == pytest_approx(pairwise_cosine_loop(a[member]))


def steps_then_backward(model, opt, x, y, steps: int):
    """`steps` optimizer steps on (x, y), then one more forward (recording activations) and backward."""
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    activations = []
    opt.zero_grad()
    F.cross_entropy(model(x, activations), y).backward()
    return activations


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-4, abs=1e-7)


def expected_statistics(layers, init, before, grads, activations, after):
    """The five statistics of one step, computed plainly layer by layer (one weight per layer: mlp)."""
    return {
        "act_norm": [a.flatten(1).float().norm(dim=1).mean() for a in activations],
        "act_cos": [torch.tensor(pairwise_cosine_loop(a), dtype=torch.float32) for a in activations],
        "grad_norm": [g.norm() for g in grads],
        "weight_norm": [w.norm() for w in before],
        "weight_change": [(w - w0).norm() / w0.norm() for w, w0 in zip(before, init)],
        "update_ratio": [(a - w).norm() / w.norm() for a, w in zip(after, before)],
    }


# logging steps in a row (W after one is W before the next: the statistics thread copies it for the
# next capture), apart (plain steps between), and in a row with the weights written in place between
SCHEDULE = ["log", "log", "log", "plain", "plain", "log", "log", "reload", "log", "log"]


def run_schedule(threaded: bool, monkeypatch):
    """The trainer's way through SCHEDULE (capture after backward, optimizer step, `.statistics()`, its
    result after the next backward); returns [(statistics, expected)] for each logging step."""
    from nrexp import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "spare_core", lambda device: threaded)
    monkeypatch.setattr(monitor_module, "idle_core", lambda: threaded)
    torch.manual_seed(0)
    cfg = compose(["model.depth=3", "model.width=40", "norm=layer"])
    model = build_model(cfg, (1, 28, 28), 10)
    opt = build_optimizer(model, cfg.optim)
    monitor = LayerMonitor(model.monitored_layers())
    layers = list(model.monitored_layers().values())
    init = [layer.weight.detach().clone() for layer in layers]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    results, pending = [], None
    for what in SCHEDULE:
        if what == "reload":  # W changes in place, with no optimizer step (after the statistics reading it)
            results.append((pending[0].result(), pending[1]))
            pending = None
            model.load_state_dict(saved)
            continue
        activations = [] if what == "log" else None
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, activations), y).backward()
        if pending is not None:  # as the trainer: the last logging step's result, before W changes
            results.append((pending[0].result(), pending[1]))
            pending = None
        if what == "log":
            before = [layer.weight.detach().clone() for layer in layers]
            grads = [layer.weight.grad.clone() for layer in layers]
            acts = [a.detach().clone() for a in activations]
            captured = monitor.capture(activations)
        opt.step()
        if what == "log":
            after = [layer.weight.detach().clone() for layer in layers]
            pending = (captured.statistics(), expected_statistics(layers, init, before, grads, acts, after))
    results.append((pending[0].result(), pending[1]))
    return monitor_module, results


def test_capture_gives_the_numbers_of_an_independent_computation_threaded_or_not(monkeypatch):
    """The trainer's path (capture, optimizer step, statistics computed on the statistics thread or
    where called, read after the next backward) gives each step's numbers as computed plainly, layer by
    layer, whether logging steps come in a row or apart, and whether the weights changed in place
    between two of them; the statistics thread and the caller's thread give the same floats."""
    from nrexp.monitor import LayerMonitor as Monitor

    kept = []
    monkeypatch.setattr(
        Monitor, "_keep_after", lambda self, after, keep=Monitor._keep_after: (kept.append(1), keep(self, after))[1]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for threaded in (False, True):
            monitor_module, runs[threaded] = run_schedule(threaded, monkeypatch)
            if threaded:
                assert monitor_module._worker is not None, "the statistics were not computed on the worker thread"
    finally:
        torch.set_num_threads(threads)
    assert kept, "W after a step was never kept for the next capture"
    assert len(runs[True]) == SCHEDULE.count("log")
    for i, ((got, expected), (inline, _)) in enumerate(zip(runs[True], runs[False])):
        assert list(got) == ["act_norm", "act_cos", "grad_norm", "weight_norm", "weight_change", "update_ratio"]
        for key, values in expected.items():
            rtol, atol = (1e-4, 1e-6) if key == "act_cos" else (1e-5, 0)  # act_cos: a difference of sums of B^2 terms
            assert torch.allclose(got[key], torch.stack(values), rtol=rtol, atol=atol), (i, key)
            assert torch.equal(got[key], inline[key]), key
            assert ((got[key] > 0) | (torch.stack(values) == 0)).all(), (i, key)  # 0: weight_change at init
    host, scalars = monitor_module.LayerMonitor.to_host(
        type("M", (), {"names": ["block00", "block01", "block02", "head"]})(),
        runs[True][-1][0],
        {"train/loss": torch.tensor(1.5)},
    )
    assert scalars == {"train/loss": 1.5}
    assert host["update_ratio"]["head"] == runs[True][-1][0]["update_ratio"][3].item()


def test_idle_core_does_not_count_our_own_busy_statistics_thread_as_other_work(monkeypatch):
    """On 2 CPUs with one intra-op thread, 2 runnable tasks leave no core for the statistics thread, unless
    one of them is that thread itself, busy with the previous logging step's job, or the figures' helper."""
    import io
    from concurrent.futures import Future

    import nrexp.monitor as monitor_module

    runnable = {"now": 2}
    real_open = open
    monkeypatch.setattr(
        monitor_module,
        "open",
        lambda path, *a: (
            io.StringIO(f"0.50 0.40 0.30 {runnable['now']}/90 123") if path == "/proc/loadavg" else real_open(path, *a)
        ),
        raising=False,
    )
    monkeypatch.setattr(monitor_module, "_CPUS", 2)
    monkeypatch.setattr(monitor_module, "_idle", [float("-inf"), True])
    job: Future = Future()
    monkeypatch.setattr(monitor_module, "_last_job", [job])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert monitor_module.statistics_thread_busy()
        assert monitor_module.idle_core(), "our own busy thread was counted as another task"
        job.set_result(None)
        assert not monitor_module.statistics_thread_busy()
        assert monitor_module.idle_core(), "read again within 50 ms: the same answer"
        monitor_module._idle[0] = float("-inf")
        assert not monitor_module.idle_core(), "2 other runnable tasks on 2 CPUs: no idle core"
        monkeypatch.setattr(monitor_module.figures, "helper_drawing", lambda: True)
        monitor_module._idle[0] = float("-inf")
        assert monitor_module.idle_core(), "the figures' helper (lowest priority) was counted as other work"
        monkeypatch.setattr(monitor_module.figures, "helper_drawing", lambda: False)
        runnable["now"] = 1
        monitor_module._idle[0] = float("-inf")
        assert monitor_module.idle_core()
    finally:
        torch.set_num_threads(threads)


def test_flush_denormal_holds_for_the_run_on_its_thread_and_the_statistics_thread(tmp_path, monkeypatch):
    """A run computes in trainer.flush_denormal's mode on its own thread and on the statistics thread,
    which outlives the run that started it (a thread's mode is its own; a new thread inherits its
    creator's), and leaves its thread's mode as it found it."""
    import os

    from nrexp import monitor as monitor_module
    from nrexp import train as train_module
    from nrexp.monitor import denormals_flushed

    monkeypatch.setattr(monitor_module, "idle_core", lambda: True)  # whatever else runs on this machine
    during, build = [], train_module.build
    monkeypatch.setattr(train_module, "build", lambda *args: (during.append(denormals_flushed()), build(*args))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leaves a core idle on a multi-core machine: the statistics thread is used
    try:
        for i, flush in enumerate((True, False, True)):
            torch.set_flush_denormal(not flush)  # what an earlier run or the process set
            train_module.train(compose(TINY + [f"trainer.flush_denormal={str(flush).lower()}"]), tmp_path / f"run{i}")
            assert during[-1] is flush
            assert denormals_flushed() is not flush
            if (os.cpu_count() or 1) > 1:
                assert monitor_module._worker is not None, "the statistics were not computed on the worker thread"
                assert monitor_module._worker.submit(denormals_flushed).result() is flush  # its last task's mode
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)  # torch's default, as a process starts


def test_host_copy_gives_to_hosts_floats():
    """host_copy (started when a logging step's scalars exist, finished when it is written) gives what
    to_host gives, with and without per-layer statistics."""
    torch.manual_seed(0)
    cfg = compose(["model.depth=2", "model.width=16"])
    model = build_model(cfg, (1, 28, 28), 10)
    opt = build_optimizer(model, cfg.optim)
    monitor = LayerMonitor(model.monitored_layers())
    activations = steps_then_backward(model, opt, torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), steps=1)
    captured = monitor.capture(activations)
    opt.step()
    future = captured.statistics()
    scalars = {"train/loss": torch.tensor(0.25), "train/acc": torch.tensor(0.5)}
    assert monitor.host_copy(future, scalars).result() == monitor.to_host(dict(future.result()), scalars)
    assert monitor.host_copy(None, scalars).result() == ({}, {"train/loss": 0.25, "train/acc": 0.5})


def test_update_ratio_at_step_t_is_the_update_right_after_step_ts_forward_backward(tmp_path):
    """By number, through a real run: with SGD without momentum or weight decay the update after step t's
    backward is -lr * dL/dW_t, so update_ratio/<layer> at step t is lr * grad_norm / weight_norm of the
    same logged step t (step 0 included: the first update, from the weights at init)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nrexp.train import train

    train(
        compose(
            TINY
            + [
                "trainer.log_every=1",
                "trainer.max_steps=4",
                "optim.momentum=0",
                "optim.lr=0.1",
                "trainer.progress=false",
            ]
        ),
        tmp_path,
    )
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()

    def series(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    lr = series("lr")
    assert set(lr) == {0, 1, 2, 3} and all(v == pytest_approx(0.1) for v in lr.values())
    for layer in ("block00", "block01", "head"):
        ratio, grad, weight = (series(f"{m}/{layer}") for m in ("update_ratio", "grad_norm", "weight_norm"))
        assert set(ratio) == {0, 1, 2, 3}  # the final probe (step 4) takes no step: no update_ratio there
        for step in ratio:
            assert ratio[step] == pytest_approx(lr[step] * grad[step] / weight[step]), (layer, step)
