"""Evaluation during training: metrics.jsonl lines per (step, EMA rate), every logger, exactly once across a kill and resume."""

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.precision import resolve_precision
from pixelflow.sampling.memory import max_fitting_batch, sampling_budget_bytes, sampling_peak_bytes
from pixelflow.training import eval_callback
from pixelflow.training.eval_callback import CPU_BATCH_SIZE, SAFETY_MARGIN, EvaluateSamples, read_metrics
from pixelflow.training.launch import run_training
from tests.hydra_utils import compose_config, tiny_train_overrides

QUICKSTART = {"method": "euler", "steps": 10, "guidance_scale": 5.0}
GIB = 2**30


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


def test_periodic_evaluation_waits_for_an_optimizer_step_of_a_real_run(tmp_path, monkeypatch):
    """trainer.accumulate_grad_batches=2: the first micro-batch ends at global step 0 and is not evaluated."""
    steps = []
    monkeypatch.setattr(EvaluateSamples, "evaluate", lambda self, trainer, pl_module: steps.append(trainer.global_step))
    extra = ["trainer.accumulate_grad_batches=2", "callbacks.evaluate.every_n_steps=1"]
    run_training(compose_config("train", _overrides(tmp_path / "run", 2, tmp_path / "cache", extra)))
    assert steps == [1, 2, 2]  # after optimizer steps 1 and 2, and at the end


def test_periodic_evaluation_waits_for_an_optimizer_step():
    """With gradient accumulation the first micro-batches end at global step 0: nothing has trained yet."""
    callback = EvaluateSamples("unused.jsonl", "mnist_test", every_n_steps=2)
    steps = []
    callback.evaluate = lambda trainer, pl_module: steps.append(trainer.global_step)
    for step in (0, 0, 1, 1, 2, 2, 3, 4):  # accumulation 2: two micro-batches per optimizer step
        callback.on_train_batch_end(SimpleNamespace(global_step=step), None)
    assert steps == [2, 4]


def test_evaluation_samples_in_the_sampling_precision_by_default(tmp_path):
    assert EvaluateSamples("unused.jsonl", "mnist_test").precision == "auto"
    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("auto", "cpu") == "fp32"
    cfg = compose_config("train", ["experiment=imagenet256_xl4", "callbacks/evaluate=fid10k", f"paths.root_dir={tmp_path}"])
    fid10k = instantiate(cfg.callbacks.evaluate)
    assert fid10k.precision == "auto" and fid10k.batch_size == "auto"
    with pytest.raises(ValueError, match="callbacks.evaluate.precision='fp16': use one of"):
        EvaluateSamples("unused.jsonl", "mnist_test", precision="fp16")
    with pytest.raises(ValueError, match="batch_size='max': use auto"):
        EvaluateSamples("unused.jsonl", "mnist_test", batch_size="max")


def _choose(callback: EvaluateSamples, monkeypatch, free_bytes: float | None, device: str = "cuda") -> int:
    """The callback's sampling batch for the Test/2 model at 32 px on one ``device`` with ``free_bytes`` free."""
    monkeypatch.setattr(eval_callback, "free_device_bytes", lambda device: free_bytes)
    module = SimpleNamespace(model=build_model("Test/2", num_classes=10), schedule=CascadeSchedule(image_size=32),
                             device=torch.device(device))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return callback.sampling_batch(trainer, module, resolve_precision(callback.precision, device))


def _budget(batch: int, precision: str) -> float:
    model = build_model("Test/2", num_classes=10)
    return sampling_budget_bytes(sampling_peak_bytes(model, 32, batch, "euler", precision, guided=True, steps=10))


def test_auto_batch_is_the_largest_that_fits_the_free_memory_less_the_margin(monkeypatch):
    free = 1.5 * GIB  # a faked free-memory figure: no GPU needed
    usable = (1 - SAFETY_MARGIN) * free
    fit = max_fitting_batch(build_model("Test/2", num_classes=10), 32, "euler", "bf16", usable, guided=True, steps=10)
    assert fit > 10 and _budget(fit, "bf16") <= usable < _budget(fit + 1, "bf16")
    assert max_fitting_batch(build_model("Test/2", num_classes=10), 32, "euler", "bf16", free, guided=True, steps=10) > fit
    callback = EvaluateSamples("unused.jsonl", "mnist_test", num_samples=3 * fit, sampler=QUICKSTART)
    assert _choose(callback, monkeypatch, free) == fit  # bf16 on CUDA: the sampling precision
    fp32 = EvaluateSamples("unused.jsonl", "mnist_test", num_samples=3 * fit, sampler=QUICKSTART, precision="fp32")
    assert _choose(fp32, monkeypatch, free) < fit  # fp32 needs more a sample
    # fit + 1 samples would take two rounds of fit and 1: two even rounds instead
    uneven = EvaluateSamples("unused.jsonl", "mnist_test", num_samples=fit + 1, sampler=QUICKSTART)
    assert _choose(uneven, monkeypatch, free) == (fit + 2) // 2


def test_an_integer_batch_is_checked_against_the_free_memory_and_refused_with_the_fix(monkeypatch):
    free = 1.5 * GIB
    fit = max_fitting_batch(build_model("Test/2", num_classes=10), 32, "euler", "bf16", (1 - SAFETY_MARGIN) * free,
                            guided=True, steps=10)
    fits = EvaluateSamples("unused.jsonl", "mnist_test", num_samples=10 * fit, batch_size=fit, sampler=QUICKSTART)
    assert _choose(fits, monkeypatch, free) == fit  # used as given
    too_big = EvaluateSamples("unused.jsonl", "mnist_test", num_samples=10 * fit, batch_size=fit + 1, sampler=QUICKSTART)
    with pytest.raises(ValueError) as refused:
        _choose(too_big, monkeypatch, free)
    message = str(refused.value)
    for needle in (f"callbacks.evaluate.batch_size={fit + 1} at 32 px (euler, bf16) needs an estimated",
                   "1.5 GiB free on cuda", "with the training state resident", f"use batch_size={fit}", "or batch_size=auto"):
        assert needle in message, message


def test_auto_refuses_a_device_where_not_one_image_fits(monkeypatch):
    callback = EvaluateSamples("unused.jsonl", "mnist_test", sampler=QUICKSTART)
    refusal = r"batch_size=auto: not even one image at 32 px \(euler, bf16\) fits the 0.4 GiB left \(90% of the 0.4 GiB free"
    with pytest.raises(ValueError, match=refusal):
        _choose(callback, monkeypatch, 0.4 * GIB)  # below the CUDA context the estimate counts


def test_on_cpu_auto_is_the_default_batch_and_an_integer_is_unchecked(monkeypatch):
    auto = EvaluateSamples("unused.jsonl", "mnist_test", num_samples=500, sampler=QUICKSTART)
    assert _choose(auto, monkeypatch, None, "cpu") == CPU_BATCH_SIZE == 100
    huge = EvaluateSamples("unused.jsonl", "mnist_test", num_samples=500, batch_size=10**6, sampler=QUICKSTART)
    assert _choose(huge, monkeypatch, None, "cpu") == 10**6


class RankZeroSays:
    """The collectives of a rank other than 0: broadcast hands out what rank 0 decided."""

    def __init__(self, rates):
        self.rates, self.calls = rates, []

    def broadcast(self, obj, src=0):
        self.calls.append(("broadcast", obj))
        return self.rates

    def barrier(self, name=None):
        self.calls.append(("barrier",))


@pytest.mark.parametrize("rates", [[], [0.9]])
def test_other_ranks_evaluate_what_rank_zero_decided_and_leave_together(tmp_path, rates):
    """Rank 1's own view of the file (no evaluation yet: all due) is not consulted; rank 0's decision is."""
    callback = EvaluateSamples(str(tmp_path / "metrics.jsonl"), "mnist_test", sampler=QUICKSTART, ema=[0.9])
    sampled = []
    callback.sampling_batch = lambda trainer, pl_module, precision: 10
    callback.sample = lambda trainer, model, schedule, batch, precision: sampled.append((model, batch, precision))
    strategy = RankZeroSays(rates)
    trainer = SimpleNamespace(global_step=4, strategy=strategy, is_global_zero=False, world_size=2, global_rank=1, loggers=[])
    module = SimpleNamespace(device=torch.device("cpu"), ema_decays=[0.9], ema_model=lambda rate: f"EMA {rate}", schedule=None)
    callback.evaluate(trainer, module)
    assert sampled == [(f"EMA {r}", 10, "fp32") for r in rates]
    assert strategy.calls == [("broadcast", None), ("barrier",)]
    assert not (tmp_path / "metrics.jsonl").exists()  # only rank 0 writes
