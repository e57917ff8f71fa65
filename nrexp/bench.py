"""`nrexp bench`: what the harness costs, measured side by side in one process, as ratios.

Arms (same model, init, data order and optimizer in each):
  a0, a2  torchvision's MNIST Dataset (PIL -> ToTensor -> Normalize) through DataLoader(shuffle=True),
          num_workers 0 and 2, a plain loop
  b       a bare loop over normalized tensors in memory (randperm + index gathers)
  c, d, e nrexp's trainer: trainer.layer_stats=false; trainer.log_every=1; the default log_every
  h       b's loop with statistics every step as written by hand: forward hooks, `.item()` per layer and
          metric, SummaryWriter.add_scalar per value
  f       nrexp's trainer with trainer.compile=true (only with --arms ... f: compiling takes minutes on CPU)
samples/s = steps * batch / the step loop's time (nrexp's arms: summary.json's train_time_s). Why ratios,
interleaved repeats and medians: the machines this runs on are small and shared, so absolute figures
swing; arms measured in turn under the same load compare. The arms' final training-set losses must
agree (same trajectory up to float rounding). Also: the start-up of a 1-step run against the imports
any PyTorch + Hydra program pays, and with --cli / --fused the command line's and the fused launcher's
costs. Data: the bundled digits tiled to an MNIST-sized set, written as idx files. docs/speed.md has
the figures and how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("a0", "a2", "b", "c", "d", "e", "h", "f", "g")
DEFAULT_ARMS = ("a0", "a2", "b", "c", "d", "e", "h")
ARM_DOC = {
    "a0": "torchvision MNIST + PIL transforms + DataLoader(shuffle, workers=0)",
    "a2": "torchvision MNIST + PIL transforms + DataLoader(shuffle, workers=2)",
    "b": "bare loop over normalized tensors (randperm + gathers)",
    "c": "nrexp trainer, trainer.layer_stats=false",
    "d": "nrexp trainer, trainer.log_every=1",
    "e": "nrexp trainer, default trainer.log_every",
    "f": "nrexp trainer, default trainer.log_every, trainer.compile=true",
    "g": "nrexp trainer, default trainer.log_every, trainer.histograms=true",
    "h": "hand-written statistics every step: forward hooks, .item() per layer and metric, add_scalar",
}
MODELS = {"mlp-3x256": (3, 256), "mlp-50x100": (50, 100)}
# (numerator, denominator, target); "a" is the faster of a0 and a2 (the conservative choice)
TARGETS = (("c", "a", 10.0), ("c", "b", 0.95), ("d", "b", 0.90), ("d", "h", 1.5), ("e", "b", 0.97))
# Beside the targets, the ratios that bound them: no harness removes arithmetic, so nrexp's loop is at
# best as fast as the bare one, and c/a can reach 10 only where b/a does; d/h, only where b/h reaches 1.5
# (at large batches the arithmetic of both loops dwarfs the statistics, and b/h tends to 1)
CEILINGS = (("b", "a", "c/a"), ("b", "h", "d/h"))


# ------------------------------------------------------------------------------------------------
# data


def write_mnist_like(root: Path, n_train: int, n_test: int) -> dict[str, str]:
    """Tile the bundled real digits to n_train / n_test and write MNIST idx files under root/MNIST/raw."""
    import numpy as np

    from nrexp.data import BUNDLED_MNIST

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with np.load(BUNDLED_MNIST) as z:
        parts = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}

    def tile(a, n):
        reps = -(-n // len(a))
        return np.concatenate([a] * reps)[:n]

    def write(name, array, magic):
        header = np.array([magic, *array.shape], dtype=">i4").tobytes()
        (raw / name).write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())

    write("train-images-idx3-ubyte", tile(parts["x_train"], n_train), 2051)
    write("train-labels-idx1-ubyte", tile(parts["y_train"], n_train), 2049)
    write("t10k-images-idx3-ubyte", tile(parts["x_test"], n_test), 2051)
    write("t10k-labels-idx1-ubyte", tile(parts["y_test"], n_test), 2049)
    return {"kind": "bundled real digits tiled", "train": n_train, "test": n_test}


# ------------------------------------------------------------------------------------------------
# arms


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import nrexp
    from nrexp import config

    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=nrexp.config_dir(), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def _fresh_model(cfg, device):
    """Model and optimizer exactly as nrexp.train.train builds them (same seed -> same init)."""
    import torch

    from nrexp.init import init_weights
    from nrexp.models import build_model
    from nrexp.optim import build_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, (1, 28, 28), 10).to(device)
    act = str(getattr(cfg.model.activation, "value", cfg.model.activation))
    init_weights(model, cfg.init.name, cfg.init.scale, act)
    return model, build_optimizer(model, cfg.optim)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_loss(model, data, cfg) -> float:
    from nrexp.evaluate import evaluate

    return evaluate(model, data.train_x, data.train_y, cfg.data.eval_batch_size, "train")["train/loss"]


def arm_naive(cfg, data, device, root: Path, steps: int, workers: int):
    """(a) torchvision-style: a Dataset of PIL images with ToTensor + Normalize, DataLoader(shuffle=True)."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import transforms
    from torchvision.datasets import MNIST

    from nrexp.data import MNIST_MEAN, MNIST_STD, epoch_generator

    model, optimizer = _fresh_model(cfg, device)
    dataset = MNIST(
        str(root),
        train=True,
        download=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]),
    )
    # What DataLoader(shuffle=True) builds, with a generator seeded as nrexp seeds epoch 0, so that it
    # draws nrexp's permutation (given to DataLoader itself, the generator would first be used for the
    # workers' base seed and the order would differ)
    gen = epoch_generator(cfg.seed, 0)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=RandomSampler(dataset, generator=gen),
        num_workers=workers,
        drop_last=True,
    )
    started = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i + 1 == steps:
            break
    _sync(device)
    seconds = time.perf_counter() - started
    del loader  # stops the workers
    return seconds, model


def arm_bare(cfg, data, device, steps: int):
    """(b) the hand-written loop: normalized tensors in memory, randperm + index gathers, nothing else."""
    import torch
    import torch.nn.functional as F

    from nrexp.data import epoch_generator

    model, optimizer = _fresh_model(cfg, device)
    x_all, y_all, batch = data.train_x, data.train_y, cfg.data.batch_size
    started = time.perf_counter()
    perm = torch.randperm(len(x_all), generator=epoch_generator(cfg.seed, 0)).to(device)  # nrexp's epoch-0 order
    for i in range(steps):
        idx = perm[i * batch : (i + 1) * batch]
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - started
    return seconds, model


def arm_hand(cfg, data, device, steps: int, run_dir: Path):
    """(h) statistics every step as a user writes them by hand: b's loop with forward hooks on the
    monitored blocks, `.item()` per layer per metric, and `SummaryWriter.add_scalar` per value. The
    same five metrics as nrexp's monitor (for a plain weight: one nn.Linear/Conv2d per layer) and the
    training loss, every step; the writer is closed after the timing, as nrexp closes its own."""
    import torch
    import torch.nn.functional as F
    from torch.utils.tensorboard import SummaryWriter

    from nrexp.data import epoch_generator

    model, optimizer = _fresh_model(cfg, device)
    layers = model.monitored_layers()
    # the module whose output is the layer's activation (a block, or the head itself)
    blocks = getattr(model, "blocks", {})
    outputs = {name: blocks[name] if name in blocks else layer for name, layer in layers.items()}
    acts: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda mod, inp, out, name=name: acts.__setitem__(name, out.detach()))
        for name, module in outputs.items()
    ]
    init = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    writer = SummaryWriter(log_dir=str(run_dir))
    x_all, y_all, batch = data.train_x, data.train_y, cfg.data.batch_size
    started = time.perf_counter()
    perm = torch.randperm(len(x_all), generator=epoch_generator(cfg.seed, 0)).to(device)  # nrexp's epoch-0 order
    for i in range(steps):
        idx = perm[i * batch : (i + 1) * batch]
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        before = {}
        for name, layer in layers.items():
            w = layer.weight.detach()
            before[name] = w.clone()
            writer.add_scalar(f"act_norm/{name}", acts[name].flatten(1).norm(dim=1).mean().item(), i)
            writer.add_scalar(f"grad_norm/{name}", layer.weight.grad.norm().item(), i)
            writer.add_scalar(f"weight_norm/{name}", w.norm().item(), i)
            writer.add_scalar(f"weight_change/{name}", ((w - init[name]).norm() / init[name].norm()).item(), i)
        optimizer.step()
        for name, layer in layers.items():
            w = layer.weight.detach()
            writer.add_scalar(f"update_ratio/{name}", ((w - before[name]).norm() / before[name].norm()).item(), i)
        writer.add_scalar("train/loss", loss.item(), i)
    _sync(device)
    seconds = time.perf_counter() - started
    writer.close()
    for hook in hooks:
        hook.remove()
    return seconds, model


def arm_nrexp(cfg, run_dir: Path):
    """(c, d, e) nrexp's own loop; its summary's train_time_s is the step loop alone; the loss is its
    evaluation of the whole training set at the end."""
    from nrexp.train import train

    summary = train(cfg, run_dir)
    return summary["train_time_s"], summary["metrics"]["train/loss"]


# ------------------------------------------------------------------------------------------------
# the run


def machine() -> dict[str, str]:
    import torch

    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    # the vector units torch's CPU kernels dispatch on (AVX2, AVX512...): with the CPU's name, what tells
    # two machines' figures apart (the model name alone can be as vague as "AMD EPYC")
    info = {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_at_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return info


def _with_best_a(median: dict[str, float]) -> dict[str, float]:
    return dict(median, a=max(median.get("a0", 0.0), median.get("a2", 0.0)))


def ratios(median: dict[str, float], rounds: dict[str, list[float]] | None = None) -> dict[str, dict]:
    """Each target's ratio of the arms' medians; with `rounds` (samples/s of each arm, round by round), also
    the spread: the lowest and highest ratio of two arms timed in the same round (under the same load)."""
    med = _with_best_a(median)
    out = {}
    for num, den, target in TARGETS:
        if med.get(num) and med.get(den):
            value = med[num] / med[den]
            out[f"{num}/{den}"] = {"value": value, "target": target, "ok": value >= target}
            if rounds:
                per_round = [n / d for n, d in zip(_arm_rounds(rounds, num), _arm_rounds(rounds, den))]
                out[f"{num}/{den}"].update(rounds=per_round, low=min(per_round), high=max(per_round))
    return out


def _arm_rounds(rounds: dict[str, list[float]], arm: str) -> list[float]:
    """An arm's samples/s round by round; "a" is the faster of a0 and a2 in each round."""
    if arm != "a":
        return rounds[arm]
    n = len(next(iter(rounds.values())))
    return [max(pair) for pair in zip(rounds.get("a0", [0.0] * n), rounds.get("a2", [0.0] * n))]


def ceilings(median: dict[str, float]) -> dict[str, dict]:
    """CEILINGS' ratios, {"b/a": {"value": ..., "bounds": "c/a"}}: what a target's ratio cannot exceed."""
    med = _with_best_a(median)
    return {
        f"{num}/{den}": {"value": med[num] / med[den], "bounds": bounded}
        for num, den, bounded in CEILINGS
        if med.get(num) and med.get(den)
    }


def time_arms(args, work: Path, device, model_name: str, batch: int) -> dict:
    """Time every arm of one (model, batch) configuration, round after round; its JSON entry."""
    from nrexp.data import load_dataset

    depth, width = MODELS[model_name]
    steps = max(args.samples // batch, args.min_steps)
    base = [
        f"model.depth={depth}",
        f"model.width={width}",
        f"data.batch_size={batch}",
        "data.source=local",
        f"data.root={work / 'data'}",
        f"trainer.device={args.device}",
        f"trainer.max_steps={steps}",
        "trainer.progress=false",
        "seed=0",
    ]
    arm_overrides = {
        "c": ["trainer.layer_stats=false"],
        "d": ["trainer.log_every=1"],
        "e": [],
        "f": ["trainer.compile=true"],
        "g": ["trainer.histograms=true"],
    }
    arm_overrides = {arm: extra for arm, extra in arm_overrides.items() if arm in args.arms or arm == "e"}
    cfgs = {arm: compose(base + extra) for arm, extra in arm_overrides.items()}
    # the warm-up round (imports, allocator, thread pools, first figures) runs a few steps only
    warm_steps = min(steps, 4)
    warm_cfgs = {
        arm: compose(base + extra + [f"trainer.max_steps={warm_steps}"]) for arm, extra in arm_overrides.items()
    }
    cfg = cfgs["e"]
    data = load_dataset(cfg.data, device)
    times: dict[str, list[float]] = {a: [] for a in args.arms}
    losses: dict[str, float] = {}
    rounds = ([] if args.no_warmup else ["warmup"]) + list(range(args.repeats))
    for rnd in rounds:
        warm = rnd == "warmup"
        n = warm_steps if warm else steps
        for arm in args.arms:
            if arm in ("a0", "a2"):
                sec, loss = arm_naive(cfg, data, device, work / "data", n, int(arm[1]))
            elif arm == "b":
                sec, loss = arm_bare(cfg, data, device, n)
            elif arm == "h":
                sec, loss = arm_hand(cfg, data, device, n, work / "runs" / f"{model_name}-b{batch}-h-{rnd}")
            else:
                sec, loss = arm_nrexp(
                    (warm_cfgs if warm else cfgs)[arm], work / "runs" / f"{model_name}-b{batch}-{arm}-{rnd}"
                )
            if not warm:
                times[arm].append(steps * batch / sec)
                if arm not in losses:  # bare arms return their model: evaluate it as nrexp does, once
                    losses[arm] = loss if isinstance(loss, float) else _train_loss(loss, data, cfg)
        if args.verbose:
            print(
                f"  {model_name} b{batch} round {rnd}: "
                + "  ".join(f"{a} {times[a][-1]:,.0f}" for a in args.arms if times[a] and rnd != "warmup"),
                flush=True,
            )
    median = {a: statistics.median(v) for a, v in times.items()}
    ref = losses.get("b", next(iter(losses.values())))
    spread = max(abs(v - ref) / max(abs(ref), 1e-12) for v in losses.values())
    entry = {
        "model": model_name,
        "depth": depth,
        "width": width,
        "batch": batch,
        "steps": steps,
        "samples_per_s": times,
        "median": median,
        "ratios": ratios(median, times),
        "ceilings": ceilings(median),
        "loss_after_steps": losses,
        "loss_max_rel_diff": spread,
        "losses_agree": spread <= args.loss_rtol,
    }
    return entry


def run(args) -> dict:
    import torch

    import nrexp.console
    from nrexp.train import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    # Every arm in the mode nrexp's arms run in (trainer.flush_denormal, on by default), set before any
    # thread starts: the naive and bare arms should not be the ones computing with denormals.
    torch.set_flush_denormal(True)
    nrexp.console.console.quiet = True  # the trainer's per-run summary table would drown the benchmark's
    work = Path(tempfile.mkdtemp(prefix="nrexp-bench-"))
    data_info = write_mnist_like(work / "data", args.train_size, max(args.train_size // 6, 1000))
    device = resolve_device(args.device)
    result = {
        "machine": machine(),
        "device": str(device),
        "data": data_info,
        "settings": {
            "samples_per_measure": args.samples,
            "min_steps": args.min_steps,
            "threads": args.threads,
            "repeats": args.repeats,
            "arms": list(args.arms),
            "startup_repeats": args.startup_repeats,
            "warmup": not args.no_warmup,
            "tiny": args.tiny,
        },
        "arms": {a: ARM_DOC[a] for a in args.arms},
        "configs": [],
    }
    t_start = time.perf_counter()
    for model_name in [] if args.no_arms else args.models:
        for batch in args.batches:
            entry = time_arms(args, work, device, model_name, batch)
            result["configs"].append(entry)
            print_entry(entry)
    if args.startup_repeats:
        result["startup"] = startup_check(work, args.startup_repeats, args.threads)
    if args.cli:
        result["cli"] = cli_checks(work, args.sweep_jobs, rss=not args.tiny, threads=args.threads)
    if args.fused:
        result["fused"] = fused_checks(
            work, args.fused_data, args.fused_batches, args.fused_repeats, args.threads, args.device
        )
    result["total_s"] = time.perf_counter() - t_start
    if args.tiny:  # a smoke test's figures say nothing of the targets: none is judged (ok: null)
        for verdict in (
            [r for e in result["configs"] for r in e["ratios"].values()]
            + [b for f in result.get("fused", {}).values() for b in f["batches"].values()]
            + ([result["startup"]] if "startup" in result else [])
        ):
            verdict["ok"] = None
    return result


# ------------------------------------------------------------------------------------------------
# the command line around the loop: start-up, memory, and per-job cost of a sweep


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def _cli_env(work: Path, threads: int) -> dict[str, str]:
    """Subprocesses run this checkout's nrexp, with OMP_NUM_THREADS=threads (as the timed arms), no MNIST files."""
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        NREXP_DATA_ROOT=str(work / "no-data"),
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


STARTUP_COMMAND = ["train", "trainer.max_steps=1", "data.source=bundled"]
STARTUP_BASELINE = "import torch, torch.optim, hydra"
STARTUP_TARGET = 1.5  # (wall - train_time_s) of the 1-step run over the baseline imports' wall time, at most


def startup_check(work: Path, repeats: int, threads: int) -> dict:
    """Start-up: the wall time of `nrexp train trainer.max_steps=1 data.source=bundled` less its own step
    loop (summary.json's train_time_s), over the wall time of `python -c "<STARTUP_BASELINE>"`: what a run
    costs beyond the imports any PyTorch + Hydra program pays. Interleaved (baseline, run, ...), medians."""
    env = _cli_env(work, threads)
    cwd = work / "startup"
    cwd.mkdir(parents=True, exist_ok=True)
    baseline, wall, train = [], [], []
    for rep in range(repeats):
        baseline.append(_timed([sys.executable, "-c", STARTUP_BASELINE], cwd, env))
        run_dir = cwd / f"run{rep}"
        wall.append(_timed([sys.executable, "-m", "nrexp", *STARTUP_COMMAND, f"hydra.run.dir={run_dir}"], cwd, env))
        train.append(json.loads((run_dir / "summary.json").read_text())["train_time_s"])
    overhead = [w - t for w, t in zip(wall, train)]
    ratio = statistics.median(overhead) / statistics.median(baseline)
    return {
        "command": "nrexp " + " ".join(STARTUP_COMMAND),
        "baseline": f'python -c "{STARTUP_BASELINE}"',
        "wall_s": wall,
        "train_time_s": train,
        "overhead_s": overhead,
        "baseline_s": baseline,
        "median_overhead_s": statistics.median(overhead),
        "median_baseline_s": statistics.median(baseline),
        "ratio": ratio,
        "target": STARTUP_TARGET,
        "ok": ratio <= STARTUP_TARGET,
    }


def startup_lines(result: dict) -> list[str]:
    s = result.get("startup")
    if not s:
        return []
    verdict = "" if s["ok"] is None else f" (target <= {s['target']:g}x{'' if s['ok'] else ' ✗'})"
    spread = f"{min(s['overhead_s']):.2f}-{max(s['overhead_s']):.2f}"
    return [
        f"start-up: `{s['command']}` wall minus its train_time_s {s['median_overhead_s']:.2f} s (range {spread}) "
        f"over `{s['baseline']}` {s['median_baseline_s']:.2f} s (range {min(s['baseline_s']):.2f}-"
        f"{max(s['baseline_s']):.2f}) -> **{s['ratio']:.2f}x**{verdict}, "
        f"median of {len(s['wall_s'])} interleaved runs"
    ]


def cli_checks(work: Path, sweep_jobs: int, rss: bool, threads: int) -> dict:
    """`nrexp --help` and `nrexp train --cfg job` wall time; a sweep's per-job overhead; peak RSS of `nrexp train`.

    The subprocesses get OMP_NUM_THREADS=threads (as the timed arms use), unless threads is 0.
    """
    env = _cli_env(work, threads)
    nrexp_cmd = [sys.executable, "-m", "nrexp"]
    out: dict = {}
    cwd = work / "cli"
    cwd.mkdir(parents=True, exist_ok=True)
    out["help_s"] = statistics.median(_timed(nrexp_cmd + ["--help"], cwd, env) for _ in range(3))
    out["cfg_job_s"] = statistics.median(_timed(nrexp_cmd + ["train", "--cfg", "job"], cwd, env) for _ in range(3))
    if sweep_jobs:
        # (wall - training) / jobs of one sweep mixes what every job pays (composing its config, its
        # .hydra/ files, its run's set-up and final work) with what the process pays once (interpreter,
        # imports). A second, smaller sweep separates them: the difference is the cost per additional job.
        sweeps = {}
        for jobs in sorted({max(sweep_jobs // 4, 1), sweep_jobs}):
            args = [
                "train",
                "-m",
                f"seed=range({jobs})",
                "trainer.max_steps=1",
                "data.source=bundled",
                "trainer.progress=false",
            ]
            sweep_cwd = cwd / f"sweep{jobs}"
            sweep_cwd.mkdir(parents=True, exist_ok=True)
            wall = _timed(nrexp_cmd + args, sweep_cwd, env)
            summaries = [json.loads(p.read_text()) for p in (sweep_cwd / "outputs").rglob("summary.json")]
            train_s = sum(s["train_time_s"] for s in summaries)
            sweeps[jobs] = {
                "command": "nrexp " + " ".join(args),
                "jobs": len(summaries),
                "wall_s": wall,
                "sum_train_time_s": train_s,
                "overhead_per_job_s": (wall - train_s) / max(len(summaries), 1),
            }
        out["sweep"] = sweeps[sweep_jobs]
        if len(sweeps) == 2:
            small, big = (sweeps[n] for n in sorted(sweeps))
            marginal = ((big["wall_s"] - big["sum_train_time_s"]) - (small["wall_s"] - small["sum_train_time_s"])) / (
                big["jobs"] - small["jobs"]
            )
            out["sweep"].update(
                small_jobs=small["jobs"],
                small_wall_s=small["wall_s"],
                marginal_per_job_s=marginal,
                once_per_process_s=(big["wall_s"] - big["sum_train_time_s"]) - big["jobs"] * marginal,
            )
    if rss and Path("/usr/bin/time").exists():
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *nrexp_cmd, "train", "trainer.progress=false"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        kb = next(
            (int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line), None
        )
        out["train_default_peak_rss_mb"] = None if kb is None else kb / 1024
        out["train_default_note"] = "default `nrexp train` (data.source=auto; no MNIST here, so the bundled sample)"
    return out


# ------------------------------------------------------------------------------------------------
# fused sweeps (issue 8): the same sweep under the basic launcher and hydra/launcher=fused

FUSED_SWEEP = [
    "seed=0,1,2,3",
    "optim.weight_decay=0,1e-4",
    "dropout.p=0,0.2",
    "model.depth=3",
    "model.width=100",
    "trainer.progress=false",
]  # 16 members of a 3 x 100 MLP
# What the sweep trains on (issue 8 names the sweep, not its data), {name: (description, overrides)}; `{data}` is
# the bench's MNIST-like folder. "bundled": the sample every install has, where start-up (imports of torch and
# torch._dynamo, ~2.5 s) is half of the fused sweep's time; "mnist": one epoch of a 60,000-digit MNIST, the data
# the users train on (at a fifth of the default trainer.epochs), where the step loops weigh more.
FUSED_DATA = {
    "bundled": ("5 epochs of the bundled 4,000 digits", ["data.source=bundled"]),
    "mnist": ("1 epoch of the bench's MNIST-like data", ["data.source=local", "data.root={data}", "trainer.epochs=1"]),
}
BUNDLED_TRAIN = 4000  # training digits of the bundled sample (nrexp/assets/mnist_sample.npz): FUSED_DATA["bundled"]
FUSED_TARGETS = {128: 1.3, 32: 2.0}  # whole-sweep speed-up over the basic launcher (issue 8, 2-core CPU)


def fused_checks(work: Path, workloads: list[str], batches: list[int], repeats: int, threads: int, device: str) -> dict:
    """fused_sweep for each of FUSED_DATA's `workloads`: {name: its result}."""
    return {name: fused_sweep(work, name, batches, repeats, threads, device) for name in workloads}


def fused_sweep(work: Path, workload: str, batches: list[int], repeats: int, threads: int, device: str) -> dict:
    """Wall time of one 16-job sweep, start-up included, under the basic and the fused launcher.

    Interleaved (basic, fused, basic, fused, ...), median of `repeats`, each a fresh `nrexp train -m`
    process. Also read back: the sum of the basic jobs' step loops and the fused group's one, and how
    far each fused member's final test accuracy is from its basic twin's. The two compute the same
    steps with other float rounding (batched vs single matmuls); most pairs end equal to 1e-6, while in
    some a rounding difference is amplified over hundreds of steps (a unit crossing zero) into a
    difference of a few test examples."""
    env = _cli_env(work, threads)
    cwd = work / "fused"
    cwd.mkdir(parents=True, exist_ok=True)
    description, data_overrides = FUSED_DATA[workload]
    sweep = FUSED_SWEEP + [o.format(data=work / "data") for o in data_overrides]
    out: dict = {
        "data": description,
        "batches": {},
        "command": "nrexp train -m "
        + " ".join(FUSED_SWEEP + [o.format(data="<data>") for o in data_overrides])
        + f" trainer.device={device} data.batch_size=B [hydra/launcher=fused]",
    }
    for batch in batches:
        walls: dict[str, list[float]] = {"basic": [], "fused": []}
        loops: dict[str, list[float]] = {"basic": [], "fused": []}
        accs: dict[str, dict[str, float]] = {}
        for rep in range(repeats):
            for launcher in ("basic", "fused"):
                sweep_dir = cwd / f"{workload}-b{batch}-{launcher}-{rep}"
                cmd = [
                    sys.executable,
                    "-m",
                    "nrexp",
                    "train",
                    "-m",
                    *sweep,
                    f"data.batch_size={batch}",
                    f"trainer.device={device}",
                    f"hydra/launcher={launcher}",
                    f"hydra.sweep.dir={sweep_dir}",
                ]
                walls[launcher].append(_timed(cmd, cwd, env))
                summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.rglob("summary.json")}
                times = [s["train_time_s"] for s in summaries.values()]
                loops[launcher].append(sum(times) if launcher == "basic" else max(times))  # the group's loop is shared
                accs[launcher] = {name: s["metrics"]["test/acc"] for name, s in summaries.items()}
                shutil.rmtree(sweep_dir, ignore_errors=True)
        median = {k: statistics.median(v) for k, v in walls.items()}
        assert accs["basic"].keys() == accs["fused"].keys(), "the two sweeps made different job dirs"
        gaps = sorted(abs(accs["basic"][k] - accs["fused"][k]) for k in accs["basic"])
        target = FUSED_TARGETS.get(batch)
        ratio = median["basic"] / median["fused"]
        # The loops' ratio is what the sweep's tends to as training gets longer: the rest (start-up, every
        # job's or member's files and evaluations) both launchers pay about equally, so it pulls the sweep's down
        loop_ratio = statistics.median(loops["basic"]) / statistics.median(loops["fused"])
        out["batches"][batch] = {
            "wall_s": walls,
            "median_wall_s": median,
            "step_loops_s": loops,
            "speedup": ratio,
            "loop_speedup": loop_ratio,
            "target": target,
            "ok": None if target is None else ratio >= target,
            "jobs": len(accs["fused"]),
            "test_acc_abs_diff": gaps,
            "pairs_equal_1e-4": sum(g <= 1e-4 for g in gaps),
        }
        print(
            f"fused sweep, {description}, batch {batch}: basic {median['basic']:.1f} s, "
            f"fused {median['fused']:.1f} s -> "
            f"{ratio:.2f}x"
            + ("" if target is None else f" (target >= {target:g}x)")
            + f"; test accuracy equal (1e-4) in {sum(g <= 1e-4 for g in gaps)} of {len(gaps)} pairs, "
            f"largest gap {gaps[-1]:.3f}",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------------------------
# output


def print_entry(entry: dict) -> None:
    from rich.console import Console

    loss = "  ".join(f"{a} {v:.5f}" for a, v in entry["loss_after_steps"].items())
    verdict = "agree" if entry["losses_agree"] else "DISAGREE"
    Console(width=None if sys.stdout.isatty() else 200).print(
        f"[bold]{entry['model']} batch {entry['batch']}[/]: {entry['steps']} steps; train-set loss "
        f"after them: {loss} -> {verdict} (max rel diff {entry['loss_max_rel_diff']:.1e})"
    )


def table_rows(result: dict) -> list[list[str]]:
    arms = result["settings"]["arms"]
    rows = []
    for e in result["configs"]:
        row = [e["model"], str(e["batch"])] + [f"{e['median'][a]:,.0f}" for a in arms]
        for num, den, _target in TARGETS:
            r = e["ratios"].get(f"{num}/{den}")
            several = r is not None and "low" in r and len(r["rounds"]) > 1
            spread = f" ({r['low']:.2f}-{r['high']:.2f})" if several else ""
            row.append("-" if r is None else f"{r['value']:.2f}{spread}{' ✗' if r['ok'] is False else ''}")
        for num, den, _ in CEILINGS:
            r = e["ceilings"].get(f"{num}/{den}")
            row.append("-" if r is None else f"{r['value']:.2f}")
        row.append("yes" if e["losses_agree"] else "NO")
        rows.append(row)
    return rows


def headers(result: dict) -> list[str]:
    return (
        ["model", "batch"]
        + [f"{a} samples/s" for a in result["settings"]["arms"]]
        + [f"{n}/{d} (≥{t:g})" for n, d, t in TARGETS]
        + [f"{n}/{d} (ceiling of {b})" for n, d, b in CEILINGS]
        + ["losses agree"]
    )


def cli_lines(result: dict) -> list[str]:
    c = result.get("cli")
    if not c:
        return []
    lines = [
        f"`nrexp --help`: {c['help_s']:.2f} s; `nrexp train --cfg job`: {c['cfg_job_s']:.2f} s (target < 1 s each)"
    ]
    if "sweep" in c:
        sw = c["sweep"]
        lines.append(
            f"sweep `{sw['command']}`: {sw['jobs']} jobs, wall {sw['wall_s']:.1f} s, sum of train_time_s "
            f"{sw['sum_train_time_s']:.2f} s -> overhead {sw['overhead_per_job_s']:.2f} s per job "
            "(target <= 0.3 s)"
        )
        if "marginal_per_job_s" in sw:
            lines.append(
                f"of which, from a second sweep of {sw['small_jobs']} jobs (wall {sw['small_wall_s']:.1f} s): "
                f"{sw['marginal_per_job_s']:.2f} s per additional job, "
                f"{sw['once_per_process_s']:.1f} s once per "
                "process (start-up, imports)"
            )
    if c.get("train_default_peak_rss_mb") is not None:
        lines.append(
            f"peak RSS of {c['train_default_note']}: {c['train_default_peak_rss_mb']:.0f} MB (target <= 1536 MB)"
        )
    return lines


def fused_lines(result: dict) -> list[str]:
    lines = []
    for f in result.get("fused", {}).values():
        lines += _fused_workload_lines(f)
    return lines


def _fused_workload_lines(f: dict) -> list[str]:
    lines = [
        f"fused sweep on {f['data']}, `{f['command']}` (16 jobs), whole-sweep wall time, median of "
        f"{len(next(iter(f['batches'].values()))['wall_s']['basic'])} interleaved runs:"
    ]
    for batch, b in f["batches"].items():
        m, loops = b["median_wall_s"], {k: statistics.median(v) for k, v in b["step_loops_s"].items()}
        verdict = "" if b["ok"] is None else f" (target >= {b['target']:g}x{'' if b['ok'] else ' ✗'})"
        lines.append(
            f"batch {batch}: basic launcher {m['basic']:.1f} s, fused {m['fused']:.1f} s -> "
            f"**{b['speedup']:.2f}x**{verdict}; step loops: 16 basic jobs {loops['basic']:.1f} s, fused group "
            f"{loops['fused']:.1f} s ({b['loop_speedup']:.2f}x, the sweep's ratio as training gets longer); "
            f"final test accuracy equal (to 1e-4) in {b['pairs_equal_1e-4']} of {b['jobs']} pairs, "
            "largest gap "
            f"{max(b['test_acc_abs_diff']):.3f} (rounding amplified by training)"
        )
    return lines


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        "--tiny, a smoke test: numbers meaningless, no target judged"
        if result["settings"].get("tiny")
        else "✗ = below target"
    )
    table = Table(title=f"nrexp bench: median samples/s and ratios ({title})", header_style="bold")
    for i, h in enumerate(headers(result)):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if table.row_count:  # --no-arms: only the --cli / --fused lines below
        console.print(table)
        for arm, doc in result["arms"].items():
            console.print(f"  {arm}: {doc}")
    m = result["machine"]
    console.print(
        f"  machine: {m['nproc']} CPUs, {m['cpu']} ({m['cpu_capability']}), torch {m['torch']} "
        f"({m['torch_threads']} threads), "
        f"device {result['device']}; data: {result['data']['kind']} to {result['data']['train']} train"
    )
    for line in startup_lines(result) + cli_lines(result) + fused_lines(result):
        console.print("  " + line, markup=False)


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = (
        [
            "**--tiny, a smoke test: numbers meaningless, no target judged (the targets quoted are not met or "
            "missed by it).**",
            "",
        ]
        if s.get("tiny")
        else []
    )
    lines += ["| " + " | ".join(headers(result)) + " |", "|" + "---|" * len(headers(result))]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    lines += [
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}, {m['cpu_capability']}), torch {m['torch']} "
        f"with {m['torch_threads']} threads, "
        f"Python {m['python']}, device {result['device']}, "
        f"load average at start {m.get('loadavg_at_start', '?')}. "
        f"Data: {result['data']['kind']} to {result['data']['train']} x 28 x 28 uint8. "
        f"Median of {s['repeats']} interleaved repeats of ~{s['samples_per_measure']:,} samples per arm; "
        "in parentheses, the lowest and highest ratio of the two arms within one round.",
    ]
    lines += [f"- {a}: {doc}" for a, doc in result["arms"].items()]
    extra = startup_lines(result) + cli_lines(result) + fused_lines(result)
    lines += [""] + [f"- {line}" for line in extra] if extra else []
    return "\n".join(lines) + "\n"


def _int_at_least(minimum: int):
    """An argparse type: an int >= minimum, else argparse's one-line error naming the flag."""

    def parse_int(text: str) -> int:
        value = int(text)  # not a number: argparse says "invalid int value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse_int.__name__ = "int"
    return parse_int


def parser() -> argparse.ArgumentParser:
    """`nrexp bench`'s options."""
    p = argparse.ArgumentParser(
        prog="nrexp bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer samples, a 12k-image dataset, 5 repeats (a few minutes; e/b reads low there: 32 "
        "steps at batch 128 are mostly a run's start, see the default of --samples)",
    )
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny data, 1 repeat (seconds; numbers meaningless)")
    p.add_argument(
        "--samples",
        type=_int_at_least(1),
        default=None,
        help="samples per timed measurement (default 32768: 256 steps at batch 128, a dozen periods of "
        "the default trainer.log_every; quick 4096)",
    )
    p.add_argument(
        "--min-steps",
        type=_int_at_least(1),
        default=None,
        help="at least this many steps per measurement (default 16; quick 8)",
    )
    p.add_argument("--repeats", type=_int_at_least(1), default=None, help="interleaved repeats per arm (default 5)")
    p.add_argument(
        "--train-size",
        type=_int_at_least(1),
        default=None,
        help="training images of the MNIST-like data (default 60000; quick 12000)",
    )
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=_int_at_least(1), default=[128, 1024])
    p.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(DEFAULT_ARMS),
        help="which arms to time (default: all but f, the torch.compile arm)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--threads",
        type=_int_at_least(0),
        default=1,
        help="torch intra-op threads for every arm (default 1: on a small shared machine two "
        "spinning OpenMP threads make timings swing 5-20x; 0 = torch's default)",
    )
    p.add_argument(
        "--loss-rtol", type=float, default=1e-3, help="largest relative loss difference that counts as agreeing"
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up round")
    p.add_argument(
        "--cli",
        action="store_true",
        help="also time `nrexp --help`, `nrexp train --cfg job`, a sweep's per-job overhead, peak RSS of `nrexp train`",
    )
    p.add_argument(
        "--sweep-jobs", type=_int_at_least(1), default=32, help="jobs in the --cli sweep (trainer.max_steps=1 each)"
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="also time a 16-job sweep of a 3 x 100 MLP under the basic launcher vs hydra/launcher=fused "
        "(whole sweep, start-up included; ~7 min at the defaults, ~2 with --fused-data bundled)",
    )
    p.add_argument(
        "--fused-batches", nargs="+", type=_int_at_least(1), default=[128, 32], help="batch sizes of the --fused sweeps"
    )
    p.add_argument(
        "--fused-data",
        nargs="+",
        choices=list(FUSED_DATA),
        default=list(FUSED_DATA),
        help="what the --fused sweeps train on: bundled = "
        + FUSED_DATA["bundled"][0]
        + "; mnist = "
        + FUSED_DATA["mnist"][0]
        + " (--train-size digits)",
    )
    p.add_argument(
        "--fused-repeats", type=_int_at_least(1), default=3, help="interleaved repeats of each --fused sweep"
    )
    p.add_argument("--no-arms", action="store_true", help="skip the per-step arms (e.g. with --cli or --fused alone)")
    p.add_argument(
        "--startup-repeats",
        type=_int_at_least(0),
        default=None,
        help="interleaved repeats of the start-up measurement (default 5; quick 3, tiny 1; 0 skips it)",
    )
    p.add_argument("--json", default="bench.json", help="where to write the results (default ./bench.json)")
    p.add_argument("--markdown", default=None, help="also write the table as markdown here")
    p.add_argument("-v", "--verbose", action="store_true", help="print every round's samples/s")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The options given, with each mode's defaults filled in and checked: one line for a bad value."""
    p = parser()
    args = p.parse_args(argv)
    if args.tiny:
        defaults = dict(samples=512, repeats=1, train_size=2048, min_steps=2, startup_repeats=1)
        args.no_warmup = True
    elif args.quick:
        defaults = dict(samples=4096, repeats=5, train_size=12000, min_steps=8, startup_repeats=3)
    else:
        # 32,768 samples: 256 steps at batch 128, a dozen periods of the default trainer.log_every=20, so
        # that arm e's time is not dominated by a run's start (its step-0 statistics)
        defaults = dict(samples=32768, repeats=5, train_size=60000, min_steps=16, startup_repeats=5)
    if args.no_arms:  # --cli or --fused alone
        defaults["startup_repeats"] = 0
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # what would otherwise fail minutes in, after other measurements, with a traceback
    for batch in [] if args.no_arms else args.batches:
        needed = max(args.samples // batch, args.min_steps) * batch  # run() takes this many steps
        if needed > args.train_size:  # the arms time steps within one epoch (arm a's DataLoader ends there)
            p.error(
                f"a measurement at batch {batch} takes {needed} samples, more than --train-size "
                f"{args.train_size}: use --train-size {needed} or more, or fewer --samples/--min-steps"
            )
    if args.fused and "bundled" in args.fused_data and max(args.fused_batches) > BUNDLED_TRAIN:
        p.error(
            f"--fused-batches {max(args.fused_batches)} is larger than the bundled sample's "
            f"{BUNDLED_TRAIN} training digits that the fused sweep trains on: use {BUNDLED_TRAIN} or less"
        )
    if args.fused and "mnist" in args.fused_data and max(args.fused_batches) > args.train_size:
        p.error(
            f"--fused-batches {max(args.fused_batches)} is larger than --train-size {args.train_size}, the "
            f"digits of the --fused-data mnist sweep: use {args.train_size} or less"
        )
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            folder = Path(path).parent
            try:  # made now, where the results would go anyway
                folder.mkdir(parents=True, exist_ok=True)
                writable = os.access(folder, os.W_OK | os.X_OK)
            except OSError:
                writable = False
            if not writable or Path(path).is_dir():
                p.error(f"{flag} {path}: cannot write in {folder}: choose a path in a folder you can write")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = run(args)
    result["command"] = "nrexp bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print_table(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json} ({result['total_s']:.0f} s)")
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
