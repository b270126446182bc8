"""Evaluation during training: metrics.jsonl lines per (step, EMA rate), every logger, exactly once across a kill and resume."""

import csv
from types import SimpleNamespace

import lightning as L
import pytest

from pixelflow.training.eval_callback import EvaluateSamples, read_metrics
from pixelflow.training.launch import run_training
from tests.hydra_utils import compose_config, tiny_train_overrides


class Killed(RuntimeError):
    pass


class KillAt(L.Callback):
    """Stands in for a killed job: raises after optimizer step ``step``, before that step's checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def evaluation_overrides(cache, extra=()):
    """Evaluation at the end with the quickstart's settings, cut to 20 one-step samples."""
    return [
        "callbacks/evaluate=mnist_classifier", "callbacks.evaluate.num_samples=20", "callbacks.evaluate.batch_size=10",
        "callbacks.evaluate.sampler.steps=1", f"callbacks.evaluate.cache_dir={cache}", "callbacks.evaluate.num_ref=200", *extra]


def _overrides(run_dir, steps, cache, extra=()):
    return [o for o in tiny_train_overrides(run_dir, steps) if o != "~callbacks/evaluate"] + evaluation_overrides(cache, extra)


@pytest.mark.slow
def test_final_evaluation_of_two_emas_goes_to_metrics_jsonl_and_the_logger(tmp_path, eval_cache):
    run_dir = tmp_path / "run"
    extra = ["module.ema_decays=[0.9,0.5]", "callbacks.evaluate.ema=[0.9,0.5]", "logger=csv"]
    run_training(compose_config("train", [o for o in _overrides(run_dir, 2, eval_cache, extra) if o != "logger=none"]))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["step"], r["ema_decay"]) for r in records] == [(2, 0.9), (2, 0.5)]
    for r in records:
        assert set(r["metrics"]) == {"classifier_accuracy", "classifier_fid"} and r["metrics"]["classifier_fid"] > 0
        assert r["sampler"]["steps"] == 1 and r["sampler"]["guidance_scale"] == 5.0 and r["precision"] == "fp32"
        assert r["num_samples"] == 20 and r["reference"] == "mnist_test"
    assert records[0]["metrics"] != records[1]["metrics"]  # two different sets of weights
    with open(next((run_dir / "logs").glob("version_*/metrics.csv"))) as fh:
        logged = [row for row in csv.DictReader(fh) if row.get("eval/ema0.5/classifier_fid")]
    assert len(logged) == 1 and float(logged[0]["eval/ema0.5/classifier_fid"]) == pytest.approx(records[1]["metrics"]["classifier_fid"])


@pytest.mark.slow
def test_killed_and_resumed_run_has_each_evaluation_exactly_once(tmp_path, eval_cache):
    """Evaluations at 3 and 6, checkpoints at 2 and 4; killed after step 4, before its checkpoint, so the
    step-3 evaluation was written after the checkpoint the run resumes from (step 2)."""
    every = ["callbacks.evaluate.every_n_steps=3", "callbacks.checkpoint.every_n_train_steps=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(compose_config("train", _overrides(straight, 6, eval_cache, every)))
    kill = ["+callbacks.kill._target_=tests.training.test_eval_callback.KillAt", "+callbacks.kill.step=4"]
    with pytest.raises(Killed):
        run_training(compose_config("train", _overrides(resumed, 6, eval_cache, every + kill)))
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [3]
    run_training(compose_config("train", _overrides(resumed, 6, eval_cache, every)))  # resumes from step 2
    got, want = read_metrics(resumed / "metrics.jsonl"), read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 6]  # the end evaluation at 6 is not repeated
    for a, b in zip(got, want):
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-6)  # exact resume, fixed seeds: the same numbers
    run_training(compose_config("train", _overrides(resumed, 6, eval_cache, every)))  # a finished run started again adds nothing
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [3, 6]


@pytest.mark.parametrize(("extra", "match"), [
    (["callbacks.evaluate.ema=[0.7]"], "no EMA with rate 0.7"),
    (["callbacks.evaluate.sampler.method=rk4"], "callbacks.evaluate.sampler: sampler method must be one of"),
    (["callbacks.evaluate.sampler.steps=[1,2]"], r"sampler steps \[1, 2\] give 2 stage\(s\) but the schedule has 4"),
    (["callbacks.evaluate.classifier=false"], "leave no metric"),
    (["callbacks.evaluate.ref=/nonexistent/ref.npz"], "ref.npz"),
])
def test_bad_settings_fail_before_training(tmp_path, extra, match):
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match=match):
        run_training(compose_config("train", _overrides(run_dir, 2, tmp_path / "cache", extra)))
    assert not (run_dir / "checkpoints").exists()


def test_periodic_evaluation_waits_for_an_optimizer_step():
    """With gradient accumulation the first micro-batches end at global step 0: nothing has trained yet."""
    callback = EvaluateSamples("unused.jsonl", "mnist_test", every_n_steps=2)
    steps = []
    callback.evaluate = lambda trainer, pl_module: steps.append(trainer.global_step)
    for step in (0, 0, 1, 1, 2, 2, 3, 4):  # accumulation 2: two micro-batches per optimizer step
        callback.on_train_batch_end(SimpleNamespace(global_step=step), None)
    assert steps == [2, 4]
