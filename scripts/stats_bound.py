"""The floor under `nrexp bench`'s arm d: what exact per-layer statistics every step cost a bare loop when all
of their work is a few calls that hold no GIL (no Python per layer, no host copy, no event written).

    python scripts/stats_bound.py [--depth 3] [--width 256] [--batch 128] [--steps 256] [--repeats 5]

Arms, timed in turn round after round, each the bare loop of `nrexp bench` (arm b: nrexp's model, init,
SGD and data order; here the bundled digits, so that it runs offline) plus:
  bare    nothing
  copy    W copied into a buffer every step (what update_ratio needs: W before the optimizer step)
  main    the statistics, the copy included, in two TorchScript calls on the loop's own thread
  thread  the copy on the loop's thread, the statistics as one job of a second thread, during the optimizer
          step and the next forward and backward. TorchScript calls release the GIL: what a C++ extension costs
  overlap as nrexp schedules statistics every step: dL/dW's and the activations' after backward, during the
          optimizer step; W's (the copy included) after the step, during the next forward and backward, which
          the next optimizer step waits for; both on the second thread
The statistics are LayerMonitor's, the same numbers (tests/test_stats_bound.py): act_norm, act_cos,
grad_norm, weight_norm, weight_change and update_ratio, of plain weights (one weight per layer). Printed:
each arm's median samples/s and its ratio to bare (the lowest and highest of the rounds' ratios).
docs/speed.md has the figures and what they bound.
"""

from __future__ import annotations

import argparse
import statistics as stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

ARMS = ("bare", "copy", "main", "thread", "overlap")
ROWS = ("act_norm", "act_cos", "grad_norm", "weight_norm", "weight_change", "update_ratio")


def weight_statistics(
    now: list[torch.Tensor],
    before: list[torch.Tensor],
    init: list[torch.Tensor],
    init_norms: torch.Tensor,
    before_norms: torch.Tensor,
) -> torch.Tensor:
    """(weight_norm, weight_change, update_ratio) x layers of W = `now`: update_ratio of the step before,
    from W before it (`before`, whose norms are `before_norms`): ||now - before|| / ||before||."""
    change = torch._foreach_sub(now, init)
    update = torch._foreach_sub(now, before)
    norms = torch.stack(torch._foreach_norm(now + change + update)).view(3, -1)
    return torch.stack([norms[0], norms[1] / init_norms, norms[2] / before_norms])


def grad_activation_statistics(grads: list[torch.Tensor], activations: list[torch.Tensor]) -> torch.Tensor:
    """(act_norm, act_cos, grad_norm) x layers, from dL/dW and the activations (examples on dim 0)."""
    act_norms, act_cos = [], []
    for a in activations:
        flat = a.flatten(1)
        rows = torch.linalg.vector_norm(flat, dim=[1])
        inverse = rows.reciprocal().nan_to_num(nan=0.0, posinf=0.0)  # an all-zero row: cosine 0 with all
        unit_sum = inverse @ flat
        batch = flat.shape[0]
        act_norms.append(rows.mean())
        act_cos.append((torch.dot(unit_sum, unit_sum) - (rows > 0).sum()) / (batch * (batch - 1)))
    return torch.stack([torch.stack(act_norms), torch.stack(act_cos), torch.stack(torch._foreach_norm(grads))])


with warnings.catch_warnings():  # torch.jit.script is deprecated; it is the stock way to a GIL-free compound call
    warnings.simplefilter("ignore", FutureWarning)
    WEIGHTS = torch.jit.script(weight_statistics)
    GRADS_ACTIVATIONS = torch.jit.script(grad_activation_statistics)


class Statistics:
    """The statistics every step for one model, LayerMonitor's formulas: W copied into one of two buffers in
    turn (this step's, the step before's), so that nothing is copied twice."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = weights
        with torch.no_grad():
            self.init = [w.detach().clone() for w in weights]
            self.buffers = ([w.detach().clone() for w in weights], [w.detach().clone() for w in weights])
            self.init_norms = torch.stack(torch._foreach_norm(self.init))
        self.before_norms = self.init_norms
        self.step = 0

    @torch.no_grad()
    def copy(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copy W (at a step's forward and backward, before its update) into this step's buffer: (now, before)."""
        now, before = self.buffers[self.step % 2], self.buffers[(self.step + 1) % 2]
        torch._foreach_copy_(now, self.weights)
        self.step += 1
        return now, before

    @torch.no_grad()
    def of_weights(self, now: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
        stats = WEIGHTS(now, before, self.init, self.init_norms, self.before_norms)
        self.before_norms = stats[0]
        return stats

    def of_current_weights(self) -> torch.Tensor:
        return self.of_weights(*self.copy())

    @torch.no_grad()
    def of_grads_activations(self, grads: list[torch.Tensor], activations: list[torch.Tensor]) -> torch.Tensor:
        return GRADS_ACTIVATIONS(grads, activations)

    def all(self, now, before, grads: list[torch.Tensor], activations: list[torch.Tensor]) -> torch.Tensor:
        """ROWS x layers of the step whose W `copy` gave (now, before)."""
        return torch.cat([self.of_grads_activations(grads, activations), self.of_weights(now, before)])


def run_arm(arm: str, cfg, data, steps: int, pool: ThreadPoolExecutor) -> float:
    """Seconds for `steps` steps of the bare loop with `arm`'s statistics."""
    from nrexp.data import TrainBatches
    from nrexp.train import build, minibatches

    torch.manual_seed(cfg.seed)
    model, optimizer, monitor = build(cfg, data, torch.device("cpu"))
    stats = Statistics(monitor.weights())
    batches = minibatches(TrainBatches(data.train_x, data.train_y, cfg.data.batch_size, cfg.seed), 0)
    jobs: list = []  # the statistics thread's jobs in flight
    started = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        activations = [] if arm not in ("bare", "copy") else None
        loss = F.cross_entropy(model(x, activations), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [w.grad for w in stats.weights]
        acts = [a.detach() for a in activations] if activations is not None else []
        for job in jobs:
            job.result()  # the weights' job reads W, which the optimizer step changes
        jobs = []
        if arm == "copy":
            stats.copy()
        elif arm == "main":
            stats.all(*stats.copy(), grads, acts)
        elif arm == "thread":  # the copy here: the job would race the optimizer step for W
            jobs = [pool.submit(stats.all, *stats.copy(), grads, acts)]
        elif arm == "overlap":
            jobs = [pool.submit(stats.of_grads_activations, grads, acts)]
        optimizer.step()
        if arm == "overlap":  # W of the next step, copied while its forward and backward run
            jobs.append(pool.submit(stats.of_current_weights))
    for job in jobs:
        job.result()
    return time.perf_counter() - started


def measure(args) -> dict[str, list[float]]:
    """samples/s of each arm, round after round (a warm-up round first, not counted). Leaves the calling thread's
    thread count and denormal mode as it found them (main() may run inside another program: the tests)."""
    from nrexp.bench import compose
    from nrexp.data import load_dataset
    from nrexp.monitor import keeping_denormal_mode

    cfg = compose(
        [f"model.depth={args.depth}", f"model.width={args.width}", f"data.batch_size={args.batch}"]
        + ["data.source=bundled", "trainer.device=cpu", "seed=0"]
    )
    data = load_dataset(cfg.data, torch.device("cpu"))
    threads = torch.get_num_threads()
    rounds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    torch.set_num_threads(args.threads)
    try:
        with keeping_denormal_mode():
            torch.set_flush_denormal(True)  # as nrexp trains (trainer.flush_denormal); the pool's thread inherits it
            with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
                for r in range(args.repeats + 1):
                    for arm in ARMS:
                        seconds = run_arm(arm, cfg, data, args.steps if r else 4, pool)
                        if r:
                            rounds[arm].append(args.steps * args.batch / seconds)
    finally:
        torch.set_num_threads(threads)
    return rounds


def report(rounds: dict[str, list[float]]) -> list[str]:
    bare = stat.median(rounds["bare"])
    lines = []
    for arm, values in rounds.items():
        per_round = [v / b for v, b in zip(values, rounds["bare"])]
        lines.append(
            f"{arm:7s} {stat.median(values):9,.0f} samples/s  /bare {stat.median(values) / bare:.3f}"
            f" ({min(per_round):.2f}-{max(per_round):.2f})"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (nrexp bench's default: 1)")
    args = p.parse_args(argv)
    print(f"mlp {args.depth}x{args.width}, batch {args.batch}, {args.steps} steps, {args.repeats} rounds")
    for line in report(measure(args)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
