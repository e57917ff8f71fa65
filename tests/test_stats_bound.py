"""scripts/stats_bound.py: its statistics are LayerMonitor's numbers (else the floor it measures would be the floor
of other work), and the script runs its arms."""

import torch
import torch.nn.functional as F

from conftest import compose, load_script


def test_the_scripted_statistics_are_layer_monitors_step_after_step():
    """Four SGD steps of a 2 x 16 MLP: rows act_norm..weight_change of each step equal LayerMonitor's statistics
    of the same step, and its update_ratio row the monitor's of the step before (ping-pong buffers)."""
    from nrexp.data import load_dataset
    from nrexp.train import build

    bound = load_script("stats_bound")
    cfg = compose(["model.depth=2", "model.width=16", "data.batch_size=32", "data.source=bundled", "seed=3"])
    data = load_dataset(cfg.data, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model, optimizer, monitor = build(cfg, data, torch.device("cpu"))
    stats = bound.Statistics(monitor.weights())
    previous = None
    for step in range(4):
        x, y = data.train_x[step * 32 : (step + 1) * 32], data.train_y[step * 32 : (step + 1) * 32]
        activations = []
        loss = F.cross_entropy(model(x, activations), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        acts = [a.detach() for a in activations]
        got = stats.all(*stats.copy(), [w.grad for w in stats.weights], acts)
        first = monitor.before_step(acts)
        optimizer.step()
        expected = monitor.after_step(first)
        assert got.shape == (len(bound.ROWS), len(monitor.names))
        for row, name in enumerate(bound.ROWS[:5]):
            torch.testing.assert_close(got[row], expected[name], rtol=1e-5, atol=1e-7, msg=f"{name} at step {step}")
        if previous is not None:
            torch.testing.assert_close(got[5], previous, rtol=1e-5, atol=1e-7, msg=f"update_ratio of step {step - 1}")
        assert step == 0 or got[4].min() > 0  # W moved from W_init: weight_change is measured, not 0
        previous = expected["update_ratio"]


def test_the_script_times_its_arms_and_leaves_the_process_as_it_was(capsys):
    from nrexp.monitor import denormals_flushed

    bound = load_script("stats_bound")
    before = (torch.get_num_threads(), denormals_flushed())
    other = "2" if before[0] == 1 else "1"  # a thread count the script must change and put back
    bound.main(["--depth", "2", "--width", "16", "--batch", "32", "--steps", "3", "--repeats", "1", "--threads", other])
    assert (torch.get_num_threads(), denormals_flushed()) == before  # the tests after it: hypothesis, torch's threads
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mlp 2x16, batch 32, 3 steps, 1 rounds"
    assert [line.split()[0] for line in lines[1:]] == list(bound.ARMS)
    assert "/bare 1.000 (1.00-1.00)" in lines[1]
    assert all(float(line.split("/bare ")[1].split()[0]) > 0 for line in lines[1:])
