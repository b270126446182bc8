"""Evaluation during training on several ranks: two gloo processes each draw half the samples and the metrics are
those of one process; FSDP is refused before the first step."""

import json
from pathlib import Path

import lightning as L
import pytest

from pixelflow.checkpoint import load_pixelflow
from pixelflow.training.eval_callback import EvaluateSamples, read_metrics
from pixelflow.training.launch import build_training, run_training
from tests.hydra_utils import compose_config, tiny_train_overrides
from tests.training.test_eval_callback import evaluation_overrides

FSDP_CPU = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "trainer.strategy._target_=tests.fsdp_cpu.CPUFSDPStrategy"]


class RecordDraws(EvaluateSamples):
    """Writes the sample indices this rank drew to ``<draws_dir>/rank<r>.json``."""

    def __init__(self, draws_dir: str, **settings):
        super().__init__(**settings)
        self.draws_dir, self.rank = Path(draws_dir), 0

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self.rank = trainer.global_rank

    def draw(self, model, schedule, indices, batch, precision):
        self.draws_dir.mkdir(parents=True, exist_ok=True)
        (self.draws_dir / f"rank{self.rank}.json").write_text(json.dumps(indices.tolist()))
        return super().draw(model, schedule, indices, batch, precision)


def _overrides(run_dir: Path, cache: Path, extra: list[str]) -> list[str]:
    """A 2-step tiny run evaluating 300 one-step samples at the end, with batch_size=auto."""
    base = [o for o in tiny_train_overrides(run_dir, 2) if o != "~callbacks/evaluate"]
    evaluation = [o for o in evaluation_overrides(cache) if "batch_size" not in o and "num_samples" not in o]
    return base + evaluation + ["callbacks.evaluate.num_samples=300", "callbacks.evaluate.batch_size=auto", *extra]


@pytest.mark.slow
def test_two_ranks_each_draw_half_and_score_what_one_process_scores(tmp_path, eval_cache):
    """300 samples on two DDP processes (gloo), batch_size=auto: on CPU 100 a batch, evened out to 4 chunks of 75;
    rank 0 draws chunks 0 and 2, rank 1 chunks 1 and 3; rank 0 gathers them in index order and scores. Sampling
    the same final EMA weights (the export) in this one process gives the same images bit for bit, hence the same
    metrics exactly."""
    run_dir, draws = tmp_path / "run", tmp_path / "draws"
    recorder = [f"callbacks.evaluate._target_={RecordDraws.__module__}.RecordDraws", f"+callbacks.evaluate.draws_dir={draws}"]
    run_training(compose_config("train", _overrides(run_dir, eval_cache, ["trainer=ddp_cpu", "global_batch_size=16", *recorder])))
    assert json.loads((draws / "rank0.json").read_text()) == [*range(0, 75), *range(150, 225)]
    assert json.loads((draws / "rank1.json").read_text()) == [*range(75, 150), *range(225, 300)]
    [record] = read_metrics(run_dir / "metrics.jsonl")
    assert record["step"] == 2 and record["ranks"] == 2 and record["batch_size"] == 75 and record["precision"] == "fp32"

    loaded = load_pixelflow(run_dir / "export" / "model.pt")  # the EMA weights the ranks sampled from
    alone = EvaluateSamples(str(tmp_path / "alone.jsonl"), record["reference"], num_samples=record["num_samples"],
                            seed=record["seed"], sampler=record["sampler"], inception=False, cache_dir=str(eval_cache), num_ref=200)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    images = alone.sample(trainer, loaded.model, loaded.schedule, 75, "fp32")
    scores = alone.score(images.numpy(), alone.labels(loaded.model).numpy())
    assert scores["samples_sha256"] == record["samples_sha256"]
    assert scores["metrics"] == record["metrics"] and record["metrics"]["classifier_fid"] > 0


def test_fsdp_is_refused_before_the_first_step_with_the_fix(tmp_path):
    cfg = compose_config("train", _overrides(tmp_path / "run", tmp_path / "cache", FSDP_CPU))
    trainer, module, _ = build_training(cfg)
    callback = next(c for c in trainer.callbacks if isinstance(c, EvaluateSamples))
    with pytest.raises(ValueError) as refused:
        callback.on_fit_start(trainer, module)
    message = str(refused.value)
    for needle in ("cannot run under FSDP", "EMA weights are sharded", "trainer=ddp", "export/model.pt", "evaluate.py"):
        assert needle in message, message
