"""Long runs: SLURM requeue (hpc) and truncated-checkpoint resume, non-finite steps, checkpoint retention,
init_from fine-tuning, and FSDP optimizer steps on CPU. Test names carry the path they check (pytest -k)."""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import CheckpointError, export_released_format, load_pixelflow
from pixelflow.model import build_model
from pixelflow.training.launch import run_training
from pixelflow.training.lit_module import DivergenceError
from pixelflow.training.retention import RetainingCheckpoint, checkpoint_step, newest_checkpoint
from tests.hydra_utils import compose_config, tiny_train_overrides


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a: Path, b: Path) -> None:
    ca, cb = _load(a), _load(b)
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    oa, ob = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)


def _fake_ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)
    return path


def _train(run_dir: Path, steps: int, *extra: str) -> Path:
    return run_training(compose_config("train", tiny_train_overrides(run_dir, steps, list(extra))))


# --------------------------------------------------------------------------- resume: requeue, truncation

@pytest.mark.parametrize("hpc_step, last_step, expected", [(7, 5, "hpc_ckpt_2.ckpt"), (3, 5, "last.ckpt")])
def test_hpc_requeue_resume_picks_the_newest_by_step(tmp_path, hpc_step, last_step, expected):
    _fake_ckpt(tmp_path / "checkpoints" / "last.ckpt", last_step)
    _fake_ckpt(tmp_path / "checkpoints" / "step_0000004.ckpt", 4)
    _fake_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 1)  # an older requeue
    _fake_ckpt(tmp_path / "hpc_ckpt_2.ckpt", hpc_step)
    choice = newest_checkpoint(tmp_path)
    assert choice.path.name == expected and choice.step == max(hpc_step, last_step)
    assert checkpoint_step(tmp_path / "hpc_ckpt_2.ckpt") == hpc_step


def test_truncated_last_ckpt_is_reported_and_the_newest_readable_one_used(tmp_path):
    last = _fake_ckpt(tmp_path / "checkpoints" / "last.ckpt", 9)
    _fake_ckpt(tmp_path / "checkpoints" / "step_0000006.ckpt", 6)
    _fake_ckpt(tmp_path / "checkpoints" / "step_0000008.ckpt", 8)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    choice = newest_checkpoint(tmp_path)
    assert choice.path.name == "step_0000008.ckpt" and choice.step == 8
    assert any("last.ckpt" in n and "unreadable" in n for n in choice.notes)


class Preempt(L.Callback):
    """After step ``step``: send ourselves SLURM's requeue signal (hpc_ckpt_1.ckpt is written at that step's end),
    then die before the next step, as the job is killed after the signal."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            raise SystemError("preempted")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """4 uninterrupted steps: where every interrupted-and-resumed run below must end."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    _train(run_dir, 4)
    return run_dir


@pytest.mark.slow
def test_hpc_requeue_resumes_from_the_signal_not_from_last_ckpt(tmp_path, monkeypatch, caplog, straight_run):
    """A SLURM job signalled at step 3 (last.ckpt at step 2) resumes at step 3 and ends where a straight run does."""
    requeued = tmp_path / "requeued"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeue_args'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    with monkeypatch.context() as env:
        env.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        for key, value in dict(SLURM_NTASKS="1", SLURM_JOB_NAME="pixelflow", SLURM_JOB_ID="4242", SLURM_PROCID="0",
                               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost").items():
            env.setenv(key, value)
        previous = signal.getsignal(signal.SIGUSR1)
        try:
            with pytest.raises(SystemError, match="preempted"):
                _train(requeued, 4, "+callbacks.preempt._target_=tests.training.test_long_runs.Preempt", "+callbacks.preempt.step=3")
        finally:
            signal.signal(signal.SIGUSR1, previous)
    assert (tmp_path / "requeue_args").read_text().split() == ["requeue", "4242"]
    assert checkpoint_step(requeued / "hpc_ckpt_1.ckpt") == 3 and checkpoint_step(requeued / "checkpoints" / "last.ckpt") == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pixelflow"):
        _train(requeued, 4)  # the requeued job runs the same command
    assert "resuming from " + str(requeued / "hpc_ckpt_1.ckpt") + " (step 3)" in caplog.text
    _assert_same_state(straight_run / "checkpoints" / "last.ckpt", requeued / "checkpoints" / "last.ckpt")
    assert not (requeued / "hpc_ckpt_1.ckpt").exists()  # superseded by the step-4 save: retention deleted it


@pytest.mark.slow
def test_truncated_last_ckpt_resume_continues_from_the_newest_readable_checkpoint(tmp_path, caplog, straight_run):
    """Killed while writing: last.ckpt and step 3 cut off; resume from step 2 and end where a straight run does."""
    killed = tmp_path / "killed"
    every = ["callbacks.checkpoint.every_n_train_steps=1"]
    _train(killed, 3, *every)
    for name in ("last.ckpt", "step_0000003.ckpt"):
        path = killed / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:4096])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pixelflow"):
        _train(killed, 4, *every)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(killed / "checkpoints" / "last.ckpt") in m and "unreadable" in m for m in warned), warned
    assert "resuming from " + str(killed / "checkpoints" / "step_0000002.ckpt") + " (step 2)" in caplog.text
    _assert_same_state(straight_run / "checkpoints" / "last.ckpt", killed / "checkpoints" / "last.ckpt")


def test_truncated_checkpoints_only_refuse_to_start_over(tmp_path):
    last = _fake_ckpt(tmp_path / "checkpoints" / "last.ckpt", 3)
    last.write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="none is readable"):
        _train(tmp_path, 2)


# --------------------------------------------------------------------------- non-finite steps

class InjectNonFinite(L.Callback):
    """At the given optimizer steps, make the batch NaN (-> NaN loss) or one gradient inf (finite loss);
    record the live and EMA weights after every step."""

    def __init__(self, steps: list[int], where: str = "batch", out: str | None = None):
        self.steps, self.where, self.out, self.weights = set(steps), where, out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "batch" and trainer.global_step in self.steps:
            batch[0].fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module):
        if self.where == "grad" and trainer.global_step in self.steps:
            next(pl_module.model.parameters()).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, *args):
        flat = lambda m: torch.cat([p.detach().flatten().clone() for p in m.parameters()])  # noqa: E731
        self.weights.append((flat(pl_module.model), flat(pl_module.sampling_model)))
        if self.out:
            torch.save({"weights": self.weights, "skipped": pl_module.skipped_steps}, self.out)


@pytest.mark.parametrize("where", ["batch", "grad"])
def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path, where):
    run_dir, out = tmp_path / "run", tmp_path / "weights.pt"
    _train(run_dir, 5, "logger=csv", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=1",
           "+callbacks.inject._target_=tests.training.test_long_runs.InjectNonFinite", "+callbacks.inject.steps=[1,2]",
           f"+callbacks.inject.where={where}", f"+callbacks.inject.out={out}")
    record = torch.load(out)
    (live, ema) = zip(*record["weights"])
    assert record["skipped"] == 2
    assert torch.equal(live[1], live[0]) and torch.equal(live[2], live[0])  # steps 1 and 2: no weight update
    assert torch.equal(ema[1], ema[0]) and torch.equal(ema[2], ema[0])      # ... and no EMA update
    assert not torch.equal(live[3], live[2]) and not torch.equal(ema[3], ema[2])  # step 3 trains again
    assert all(torch.isfinite(w).all() for w in live + ema)
    last = _load(run_dir / "checkpoints" / "last.ckpt")
    assert last["optimizer_states"][0]["state"][0]["step"] == 3  # AdamW stepped at 0, 3, 4 only
    assert last["pixelflow"]["nonfinite_steps"] == {"skipped": 2, "streak": 0}
    rows = list(csv.DictReader(open(next(run_dir.glob("logs/*/metrics.csv")))))
    skipped = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    assert skipped == [0, 1, 2, 2, 2]


def test_nonfinite_streak_stops_the_run_naming_the_step_and_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"stopping at step 4: .* 3 optimizer steps in a row \(steps 2-4.*"
                                              r"Last good checkpoint: .*last\.ckpt"):
        _train(run_dir, 8, "module.max_nonfinite_steps=3", "callbacks.checkpoint.every_n_train_steps=2",
               "+callbacks.inject._target_=tests.training.test_long_runs.InjectNonFinite", "+callbacks.inject.steps=[2,3,4,5,6,7]")
    assert not (run_dir / "export").exists()
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        state = _load(path)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    """Should weights ever become non-finite (not through a skipped step), the save is refused."""
    module = compose_and_build(tmp_path)
    with torch.no_grad():
        next(module.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(DivergenceError, match="refusing to write a checkpoint"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


def compose_and_build(tmp_path):
    from pixelflow.training.launch import build_training
    return build_training(compose_config("train", tiny_train_overrides(tmp_path / "run", 2)))[1]


# --------------------------------------------------------------------------- retention

def test_retention_keeps_last_the_newest_k_and_every_mth(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in range(10, 110, 10):
        _fake_ckpt(ckpt_dir / f"step_{step:07d}.ckpt", step)
    _fake_ckpt(ckpt_dir / "last.ckpt", 100)
    _fake_ckpt(ckpt_dir / "notes_copy.ckpt", 5)   # not from this template: never touched
    _fake_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 35)  # older than the step-100 save: superseded
    _fake_ckpt(tmp_path / "hpc_ckpt_2.ckpt", 120)  # newer (cannot happen in one run; kept, to be safe)
    callback = RetainingCheckpoint(dirpath=str(ckpt_dir), filename="step_{step:07d}", auto_insert_metric_name=False,
                                   every_n_train_steps=10, save_top_k=-1, save_last=True, keep_last=2, keep_every=3)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        max_steps=100)
    trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = 100
    assert trainer.global_step == 100
    callback.prune(trainer)
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == [
        "last.ckpt", "notes_copy.ckpt", "step_0000030.ckpt", "step_0000060.ckpt", "step_0000090.ckpt",
        "step_0000100.ckpt"]
    assert sorted(p.name for p in tmp_path.glob("hpc_*")) == ["hpc_ckpt_2.ckpt"]


@pytest.mark.slow
def test_retention_during_training_and_after_resume(tmp_path):
    run_dir = tmp_path / "run"
    retain = ["callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.keep_last=2", "callbacks.checkpoint.keep_every=3"]
    _train(run_dir, 5, *retain)
    names = lambda: sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))  # noqa: E731
    assert names() == ["last.ckpt", "step_0000003.ckpt", "step_0000004.ckpt", "step_0000005.ckpt"]
    _train(run_dir, 8, *retain)  # resumed: the rule holds over the old files too
    assert names() == ["last.ckpt", "step_0000003.ckpt", "step_0000006.ckpt", "step_0000007.ckpt", "step_0000008.ckpt"]


def test_retention_configuration_is_checked(tmp_path):
    with pytest.raises(ValueError, match="needs every_n_train_steps"):
        RetainingCheckpoint(dirpath=str(tmp_path), filename="step_{step}", keep_every=3)
    with pytest.raises(ValueError, match="needs \\{step\\}"):
        RetainingCheckpoint(dirpath=str(tmp_path), filename="weights", every_n_train_steps=5)
    cfg = compose_config("train", ["experiment=imagenet256_xl4"])
    # The stated bound of the paper recipe: last + 2 newest + every 20th of 10k-step saves over 1.6M steps.
    kept = 1 + cfg.callbacks.checkpoint.keep_last + cfg.trainer.max_steps // (
        cfg.callbacks.checkpoint.keep_every * cfg.callbacks.checkpoint.every_n_train_steps)
    assert kept == 11


# --------------------------------------------------------------------------- init_from

@pytest.mark.slow
def test_init_from_released_model_pt_and_project_ckpt(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelflow")
    source = tmp_path / "source"
    _train(source, 2)
    released = load_pixelflow(source / "export" / "model.pt").model.state_dict()
    for init in (source / "export" / "model.pt", source / "checkpoints" / "last.ckpt"):
        run_dir = tmp_path / f"tuned_{init.suffix[1:]}"
        caplog.clear()
        _train(run_dir, 2, f"init_from={init}", "module.lr=0.0")  # lr 0: the weights stay what was loaded
        assert f"initialised the model and its EMAs from {init}" in caplog.text
        ckpt = _load(run_dir / "checkpoints" / "last.ckpt")
        for key, value in released.items():
            assert torch.equal(ckpt["state_dict"]["model." + key], value), key
            assert torch.equal(ckpt["state_dict"]["emas.0.module." + key], value), key
        assert ckpt["optimizer_states"][0]["state"][0]["step"] == 2  # a fresh optimizer
    _train(run_dir, 3, f"init_from={init}")  # an existing run resumes; init_from is ignored, and says so
    assert "ignored: resuming this run from" in caplog.text


def test_init_from_size_mismatch_is_a_clear_error(tmp_path):
    other = build_model("Tiny/4", num_classes=10)
    export_released_format(other, CascadeSchedule(image_size=32), tmp_path / "export")
    with pytest.raises(CheckpointError, match=r"does not fit this run's model \(.*depth: file 4 vs run 2"):
        _train(tmp_path / "run", 2, f"init_from={tmp_path / 'export' / 'model.pt'}")
    with pytest.raises(CheckpointError, match="does not exist"):
        _train(tmp_path / "run2", 2, f"init_from={tmp_path / 'missing.pt'}")


# --------------------------------------------------------------------------- FSDP

# The quickstart's post-hoc EMA refuses FSDP (it averages the full weights every step), so FSDP runs drop it.
FSDP_CPU = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "trainer.strategy._target_=tests.fsdp_cpu.CPUFSDPStrategy", "~callbacks.posthoc_ema"]
SMALL_CLIP = ["callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.keep_last=null", "logger=csv",
              "trainer.log_every_n_steps=1", "module.lr=1e-3", "module.lr_decay_fraction=0", "module.lr_warmup_steps=0",
              "module.ema_decays=[0.5]", "trainer.gradient_clip_val=0.05",
              "+callbacks.inject._target_=tests.training.test_long_runs.InjectNonFinite", "+callbacks.inject.steps=[1]"]


def _grad_norms(run_dir: Path) -> list[float]:
    """train/grad_norm by step, over all launches of the run (a resume logs to a new version folder)."""
    norms = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        norms |= {int(r["step"]): float(r["train/grad_norm"]) for r in csv.DictReader(open(path)) if r.get("train/grad_norm")}
    return [norms[k] for k in sorted(norms)]


@pytest.mark.slow
def test_fsdp_optimizer_steps_match_ddp_with_clipping_ema_resume_and_export(tmp_path, caplog):
    """Two CPU processes (gloo) under Lightning's FSDPStrategy: steps 0-1, a resume, step 2; clipping (active: the
    global norm is above 0.05), a skipped non-finite step (NaN batch at step 1), EMA, checkpoints and export equal
    the same run under DDP."""
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    with caplog.at_level(logging.INFO, logger="pixelflow"):
        _train(fsdp, 2, *SMALL_CLIP, *FSDP_CPU)
    assert "sample-grid callback is off" in caplog.text
    _train(fsdp, 3, *SMALL_CLIP, *FSDP_CPU)  # resume from a full state-dict checkpoint under FSDP
    _train(ddp, 3, *SMALL_CLIP, "trainer=ddp_cpu")
    for step in (1, 2, 3):
        _assert_same_state(fsdp / "checkpoints" / f"step_{step:07d}.ckpt", ddp / "checkpoints" / f"step_{step:07d}.ckpt")
    norms = _grad_norms(fsdp)
    assert len(norms) == 3 and norms[0] > 0.05 and norms[2] > 0.05 and math.isnan(norms[1])
    torch.testing.assert_close(norms, _grad_norms(ddp), equal_nan=True)
    last = _load(fsdp / "checkpoints" / "last.ckpt")
    assert last["pixelflow"]["nonfinite_steps"]["skipped"] == 1 and last["optimizer_states"][0]["state"][0]["step"] == 2
    # The EMA followed the sharded live weights: ema_k = lerp(ema_{k-1}, live_k, 0.5), ema_1 = live_1; the
    # skipped step 1 moved neither.
    states = {s: _load(fsdp / "checkpoints" / f"step_{s:07d}.ckpt")["state_dict"] for s in (1, 2, 3)}
    for key in (k for k in states[1] if k.startswith("model.")):
        ema_key = "emas.0.module." + key[len("model."):]
        assert torch.equal(states[2][key], states[1][key]) and torch.equal(states[2][ema_key], states[1][ema_key])
        torch.testing.assert_close(states[1][ema_key], states[1][key], rtol=0, atol=0)
        torch.testing.assert_close(states[3][ema_key], states[1][ema_key].lerp(states[3][key], 0.5), rtol=0, atol=1e-7)
    # Step 2 trained (the zero-initialised output and adaLN layers: with the skipped step 1, gradients have not
    # reached the blocks yet).
    assert any(not torch.equal(states[3][k], states[1][k]) for k in states[1] if ".norm1.linear." in k)
    assert any(not torch.equal(states[3][k], states[1][k]) for k in states[1] if k.startswith("model.proj_out"))
    exported = load_pixelflow(fsdp / "export" / "model.pt").model.state_dict()
    assert all(torch.equal(v, states[3]["emas.0.module." + k]) for k, v in exported.items())


def test_fsdp_clipping_goes_through_the_root_module(tmp_path, monkeypatch):
    """Under an FSDP strategy the clipping hook calls clip_grad_norm_ on the root module, which sees every shard
    (Lightning's own norm clipping raises)."""
    from lightning.pytorch.strategies import FSDPStrategy

    module = compose_and_build(tmp_path)
    calls = []

    class FakeRoot:  # stands in for the FullyShardedDataParallel root: only its clip_grad_norm_ is used
        def clip_grad_norm_(self, max_norm, norm_type=2.0):
            calls.append(max_norm)
            return torch.tensor(0.5)

    class FakeStrategy(FSDPStrategy):
        def __init__(self):
            pass

        @property
        def model(self):
            return FakeRoot()

        @staticmethod
        def reduce_boolean_decision(decision, all=True):
            return decision

    class FakeTrainer:
        strategy = FakeStrategy()

    monkeypatch.setattr(type(module), "trainer", property(lambda self: FakeTrainer()))
    monkeypatch.setattr(type(module), "log", lambda self, *a, **k: None)
    optimizer = torch.optim.AdamW(module.model.parameters())
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert calls == [1.0] and module._step_finite


def test_24gb_short_schedule_keeps_the_batch_and_bounds_time_and_disk():
    cfg = compose_config("train", ["experiment=imagenet256_xl4_24gb_short"])
    assert cfg.run_name == "imagenet256_xl4_24gb_short" and cfg.trainer.devices == 1
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == cfg.global_batch_size == 256
    assert cfg.model.name == "XL/4" and cfg.model.gradient_checkpointing and cfg.trainer.precision == "bf16-mixed"
    days = cfg.trainer.max_steps * 256 * 7.16e12 / (0.4 * 165e12) / 86400  # RTX 4090 at 40% MFU (docs/scale.md)
    assert 6 < days < 7
    assert cfg.module.ema_decays[0] ** cfg.trainer.max_steps < 1e-3  # the EMA has forgotten the initial weights
    ckpt = cfg.callbacks.checkpoint
    assert 1 + ckpt.keep_last + cfg.trainer.max_steps // (ckpt.keep_every * ckpt.every_n_train_steps) <= 7


def test_fsdp_config_keeps_clipping_and_the_ddp_numerics():
    from hydra.utils import instantiate

    cfg = compose_config("train", ["experiment=imagenet256_xl4", "trainer=fsdp"])
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.precision == "bf16-mixed"  # clipped by the module hook
    strategy = instantiate(cfg.trainer.strategy)
    mp = strategy.mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.float32, torch.float32)  # bf16 only inside autocast, as DDP
