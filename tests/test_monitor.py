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
    expected_act = {}
    for name, block in model.blocks.items():
        h = block.dropout(block.act(block.norm(block.linear(h))))
        expected_act[name] = h.norm(dim=1).mean().item()
    expected_act["head"] = model.head(h).norm(dim=1).mean().item()

    weights_before = [layer.weight.detach().clone() for layer in model.monitored_layers().values()]
    opt.step()
    stats = monitor.after_step(stats)
    host, scalars = monitor.to_host(stats, {"train/loss": torch.tensor(1.5)})
    assert scalars == {"train/loss": 1.5}

    for i, (name, layer) in enumerate(model.monitored_layers().items()):
        w = layer.weight.detach()
        assert host["act_norm"][name] == pytest_approx(expected_act[name])
        assert host["grad_norm"][name] == pytest_approx(layer.weight.grad.norm().item())
        assert host["weight_norm"][name] == pytest_approx(weights_before[i].norm().item())
        init = monitor.init_weights[i]
        assert host["weight_change"][name] == pytest_approx(((weights_before[i] - init).norm() / init.norm()).item())
        assert host["weight_change"][name] > 0
        assert host["update_ratio"][name] == pytest_approx(((w - weights_before[i]).norm() / weights_before[i].norm()).item())


def test_activation_norms_keep_layer_order_across_interleaved_shapes_and_dtypes():
    """activation_norms reduces same-shaped activations together; the result is still one value per
    activation in the order given: each example's L2 norm over all its values, averaged over the batch,
    in float32 (conv maps flattened, bf16 upcast), as computed one activation at a time."""
    from nrexp.monitor import activation_norms

    torch.manual_seed(0)
    activations = [torch.randn(8, 5), torch.randn(8, 3, 2, 2), torch.randn(8, 5) * 3, torch.randn(8, 7),
                   torch.randn(8, 3, 2, 2).bfloat16(), torch.randn(8, 3, 2, 2) * 0.1]
    expected = torch.stack([a.flatten(1).float().norm(dim=1).mean() for a in activations])
    got = activation_norms(activations)
    assert got.dtype == torch.float32 and got.shape == (6,)
    assert torch.allclose(got, expected, rtol=1e-6), (got, expected)


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


def test_capture_gives_the_numbers_of_before_and_after_step_on_the_worker_thread():
    """The trainer's path (capture, optimizer step, statistics computed on the monitor's worker thread
    while the caller goes on) gives exactly before_step's and after_step's numbers, at each of three
    logging steps in a row (from the second on, capture copies W into the buffers of the one before)."""
    import copy
    import os

    from nrexp import monitor as monitor_module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leaves a core idle on a multi-core machine: the worker thread is used
    try:
        torch.manual_seed(0)
        cfg = compose(["model.depth=3", "model.width=40", "norm=layer"])
        model = build_model(cfg, (1, 28, 28), 10)
        twin = copy.deepcopy(model)
        x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
        results = []
        for net, use_capture in ((model, False), (twin, True)):
            opt = build_optimizer(net, cfg.optim)
            monitor = LayerMonitor(net.monitored_layers())
            results.append([])
            for _ in range(3):
                activations = steps_then_backward(net, opt, x, y, steps=2)  # momentum and a moved W: no trivial statistic
                if use_capture:
                    captured = monitor.capture(activations)
                    opt.step()
                    future = captured.statistics()
                    opt.zero_grad(set_to_none=True)  # the next step's forward and backward meanwhile, as the trainer
                    F.cross_entropy(net(x), y).backward()  # runs them (new gradient tensors, W not yet changed)
                    stats = future.result()
                else:
                    stats = monitor.before_step(activations)
                    opt.step()
                    stats = monitor.after_step(stats)
                results[-1].append(stats)
        if (os.cpu_count() or 1) > 1:
            assert monitor_module._worker is not None, "the statistics were not computed on the worker thread"
        for plain, captured in zip(*results):
            assert plain.keys() == captured.keys() == {"act_norm", "grad_norm", "weight_norm", "weight_change",
                                                       "update_ratio"}
            for key in plain:
                assert torch.equal(plain[key], captured[key]), key
                assert (plain[key] > 0).all(), key
        assert not torch.equal(results[0][0]["weight_norm"], results[0][2]["weight_norm"])  # the steps moved W
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
