"""The one training loop (train.run_loop): its schedule, and statuses that are always true."""

import os
import signal

import pytest

from conftest import TINY, compose


def test_every_is_true_every_n_steps_from_step_0_and_never_for_0():
    from nrexp.train import Every, Schedule

    assert [s for s in range(10) if Every(4)(s)] == [0, 4, 8]
    assert not any(Every(0)(s) for s in range(10))
    schedule = Schedule(total_steps=3, steps_per_epoch=2, log=Every(1), evaluate=Every(2), checkpoint=Every(0))
    assert [s for s in range(5) if schedule.until(s)] == [0, 1, 2]


def test_a_run_that_diverges_on_its_last_step_is_diverged(tmp_path):
    """Step 0's loss is finite (the net at init); its update makes the weights non-finite. No training
    loss shows it, the final evaluation does: the run is diverged, at step 0, not completed."""
    from nrexp.train import train

    summary = train(compose(TINY + ["trainer.max_steps=1", "optim.lr=1e30", "trainer.progress=false"]), tmp_path)
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 0 and summary["steps"] == 1
    assert summary["metrics"]["test/loss"] is None  # NaN stored as null


def test_a_signal_during_the_final_evaluation_is_interrupted_and_its_checkpoint_resumes(tmp_path, monkeypatch):
    """The checkpoint is written before the final evaluation: a Ctrl-C during it leaves status interrupted
    (signal 2) and a checkpoint at the last step, from which resume= evaluates and completes, with the
    numbers of a run never interrupted."""
    import nrexp.train
    from nrexp.train import train

    overrides = TINY + ["trainer.progress=false"]
    straight = train(compose(overrides), tmp_path / "straight")
    evaluation = nrexp.train.final_evaluation

    def interrupted_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # caught by GracefulStop: a flag, the evaluation goes on
        return evaluation(*args, **kwargs)

    monkeypatch.setattr(nrexp.train, "final_evaluation", interrupted_evaluation)
    stopped = train(compose(overrides), tmp_path / "run")
    assert stopped["status"] == "interrupted" and stopped["signal"] == signal.SIGINT and stopped["steps"] == 8
    monkeypatch.setattr(nrexp.train, "final_evaluation", evaluation)
    resumed = train(compose(overrides), tmp_path / "run", resume=True)
    assert resumed["status"] == "completed" and resumed["steps"] == 8
    assert resumed["metrics"] == pytest.approx(straight["metrics"], rel=1e-6)


def test_train_time_counts_the_steps_not_the_writers_set_up(tmp_path, monkeypatch):
    """train_time_s (throughput, the bench's timed loop) starts once the run's event file and its text
    summaries are written: a slow writer set-up is not counted."""
    import time

    import nrexp.train
    from nrexp.train import train

    opened = nrexp.train.Member.open_writer

    def slow_open(self, *args, **kwargs):
        time.sleep(0.5)
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(nrexp.train.Member, "open_writer", slow_open)
    started = time.perf_counter()
    summary = train(compose(TINY + ["trainer.max_steps=2", "trainer.progress=false"]), tmp_path)
    assert time.perf_counter() - started >= 0.5  # the set-up was slow...
    assert summary["train_time_s"] < 0.5  # ...and not training
