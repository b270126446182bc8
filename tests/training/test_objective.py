import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.training.objective import Objective, cascade_loss, stages_by_fraction

SCHEDULE = CascadeSchedule(image_size=16, num_stages=4)


def _model(prediction: str = "v"):
    torch.manual_seed(0)
    model = build_model("Test/2", num_classes=10, prediction=prediction)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _batch(n: int = 12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def _objective(**kwargs) -> Objective:
    objective = Objective(**kwargs)
    objective.check_stages(SCHEDULE.num_stages)
    return objective


def test_published_objective_gives_the_loss_of_the_previous_implementation():
    """The batch below scored 0.2909720838069916 (stages 0.17252, 0.18935, 0.30468, 0.49733) with the loss as it
    was before the objective existed; the recomputation here is that loss, line by line."""
    images, labels = _batch()
    model = _model()
    loss, logs = cascade_loss(model, SCHEDULE, images, labels, torch.Generator().manual_seed(7), label_dropout=0.1,
                              objective=_objective())
    assert loss.item() == pytest.approx(0.2909720838069916, rel=1e-6)
    assert [logs[f"stage{k}"].item() for k in range(4)] == pytest.approx(
        [0.17252303659915924, 0.18935076892375946, 0.30468010902404785, 0.4973345100879669], rel=1e-6)

    g = torch.Generator().manual_seed(7)
    stages = SCHEDULE.balanced_stages(12, generator=g)
    t_index = torch.randint(0, 1000, (12,), generator=g)
    drop = torch.rand(12, generator=g) < 0.1
    labels = torch.where(drop, torch.full_like(labels, 10), labels)
    idx = [(stages == k).nonzero(as_tuple=True)[0] for k in range(4)]
    pairs = [SCHEDULE.training_pair(images[i], k, t_index[i], generator=g) for k, i in enumerate(idx)]
    preds = model([p.x_t for p in pairs], [p.timestep for p in pairs], class_labels=labels[torch.cat(idx)])
    errors = [(pred - p.target).square().mean(dim=(1, 2, 3)) for pred, p in zip(preds, pairs)]
    assert torch.equal(loss, torch.cat(errors).mean())


class _Truth(torch.nn.Module):
    """A packed 'network' that outputs the exact target of each training pair it is given (set before the call)."""

    prediction, patch_size, null_class = "x", 2, 10

    def forward(self, xs, timesteps, class_labels=None, return_block=None):
        return [pair.truth(self.prediction) for pair in self.pairs]


def _pairs(images, generator_seed=7):
    g = torch.Generator().manual_seed(generator_seed)
    stages = SCHEDULE.balanced_stages(12, generator=g)
    t_index = torch.randint(0, 1000, (12,), generator=g)
    idx = [(stages == k).nonzero(as_tuple=True)[0] for k in range(4)]
    return idx, [SCHEDULE.training_pair(images[i], k, t_index[i], generator=g) for k, i in enumerate(idx)]


def test_x_loss_is_the_clean_image_error_and_the_truth_scores_zero_in_every_space():
    images, labels = _batch()
    model = _model("x")
    x_loss, _ = cascade_loss(model, SCHEDULE, images, labels, torch.Generator().manual_seed(7),
                             objective=_objective(prediction="x", loss="x"))
    idx, pairs = _pairs(images)
    preds = model([p.x_t for p in pairs], [p.timestep for p in pairs], class_labels=labels[torch.cat(idx)])
    torch.testing.assert_close(x_loss, torch.cat([(pred - p.clean).square().mean(dim=(1, 2, 3))
                                                  for pred, p in zip(preds, pairs)]).mean())
    for prediction in ("x", "eps"):
        truth = _Truth()
        truth.prediction, truth.pairs = prediction, pairs
        for space in ("v", "x", "eps"):
            loss, _ = cascade_loss(truth, SCHEDULE, images, labels, torch.Generator().manual_seed(7),
                                   objective=_objective(prediction=prediction, loss=space))
            assert loss.item() < 1e-10, (prediction, space)


def test_stage_fractions_are_honoured():
    for batch in (10, 64, 7):
        stages = stages_by_fraction(batch, [0.1, 0.2, 0.3, 0.4], torch.Generator().manual_seed(batch))
        counts = torch.bincount(stages, minlength=4)
        assert counts.sum() == batch
        for k, f in enumerate([0.1, 0.2, 0.3, 0.4]):
            assert int(batch * f) <= counts[k] <= int(batch * f) + 1
    objective = _objective(stage_fractions=[0.1, 0.2, 0.3, 0.4])
    draws = torch.stack([objective.stages(SCHEDULE, 20, torch.Generator().manual_seed(s)) for s in range(50)])
    assert torch.bincount(draws.flatten(), minlength=4).tolist() == [100, 200, 300, 400]


def test_stage_weights_scale_each_stages_term():
    images, labels = _batch()
    model = _model()
    base, logs = cascade_loss(model, SCHEDULE, images, labels, torch.Generator().manual_seed(1), objective=_objective())
    weighted, wlogs = cascade_loss(model, SCHEDULE, images, labels, torch.Generator().manual_seed(1),
                                   objective=_objective(stage_weights=[1.0, 1.0, 1.0, 3.0]))
    assert wlogs["stage3"] == logs["stage3"]  # the logged errors stay unweighted
    # 12 samples, 3 a stage: the finest stage's term counts three times
    expected = (logs["stage0"] + logs["stage1"] + logs["stage2"] + 3 * logs["stage3"]) * 3 / 12
    torch.testing.assert_close(weighted, expected)
    assert base != weighted


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prediction": "noise"}, "objective.prediction must be one of"),
    ({"loss": "score"}, "objective.loss must be one of"),
    ({"stage_fractions": [0.5, 0.6, 0.1, 0.1]}, "must sum to 1"),
    ({"stage_fractions": [0.5, 0.5, 0.0, 0.0]}, "list of positive numbers"),
    ({"stage_weights": [1.0, 1.0]}, "has 2 entries but the cascade has 4"),
    ({"repa": {"encoder": {"seed": 1}, "block": 1}}, "encoder must be a mapping with a _target_"),
    ({"repa": {"encoder": {"_target_": "x"}, "block": -1}}, "block must be a block index"),
])
def test_bad_objectives_are_refused_with_the_setting_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Objective.from_config(kwargs, num_stages=4)


def test_unknown_objective_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['predict'\]"):
        Objective.from_config({"predict": "x"}, num_stages=4)
