"""Few-step distillation (pixelflow.training.distill, .teacher_pairs, pixelflow.data.teacher_pairs)."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import export_released_format, load_pixelflow
from pixelflow.data.teacher_pairs import TeacherPairsDataModule, load_teacher
from pixelflow.model import build_model
from pixelflow.sampling.choice import choose_sampler
from pixelflow.sampling.generate import generate
from pixelflow.sampling.integrators import ab2
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig
from pixelflow.training.distill import DistillLitModule, draw_times, reflow_loss, reflow_targets
from pixelflow.training.teacher_pairs import read_teacher_pairs, stage_starts, write_teacher_pairs
from tests.hydra_utils import compose_config, tiny_train_overrides
from tests.training.test_long_runs import _assert_same_state

SCHEDULE = CascadeSchedule(image_size=16)
TEACHER_SAMPLER = SamplerConfig(method="euler", steps=2, guidance_scale=3.0)


@pytest.fixture
def teacher(tmp_path, tiny_model):
    export_released_format(tiny_model, CascadeSchedule(image_size=32), tmp_path / "teacher", [str(d) for d in range(10)])
    return tmp_path / "teacher" / "model.pt"


def test_stage_starts_are_the_samplers_own(tiny_model):
    """The starts rebuilt from stored ends and seeds are where the sampler entered each stage."""
    seeds, entered = [3, 11, 12], {}
    sampler = CascadeSampler(tiny_model, SCHEDULE, TEACHER_SAMPLER)
    noise = sampler.draw_noise(3, seeds=seeds)
    finals = sampler.sample(torch.tensor([1, 2, 3]), noise=noise).stage_finals
    entered[0] = noise.init
    for k in range(1, SCHEDULE.num_stages):
        entered[k] = SCHEDULE.transition(finals[k - 1], k, noise.transitions[k - 1])
    starts = stage_starts(SCHEDULE, finals, seeds, tiny_model.in_channels)
    for k in range(SCHEDULE.num_stages):
        torch.testing.assert_close(starts[k], entered[k], rtol=0, atol=0)


def test_teacher_pairs_resume_and_refuse_other_settings(tmp_path, tiny_model):
    from pixelflow.checkpoint import LoadedModel

    loaded = LoadedModel(tiny_model, SCHEDULE, None, "tiny")
    folder = write_teacher_pairs(loaded, TEACHER_SAMPLER, tmp_path / "pairs", 10, 4, seed=7)
    first = read_teacher_pairs(folder)
    (folder / "shard_0000004.npz").unlink()  # as if killed after two shards
    write_teacher_pairs(loaded, TEACHER_SAMPLER, folder, 10, 4, seed=7)
    again = read_teacher_pairs(folder)
    assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])
    assert all(torch.equal(a, b) for a, b in zip(first[3], again[3]))
    assert first[2].tolist() == [7 * 10**7 + i for i in range(10)] and first[1].tolist() == [i % 10 for i in range(10)]
    with pytest.raises(ValueError, match="other settings"):
        write_teacher_pairs(loaded, TEACHER_SAMPLER, folder, 10, 4, seed=8)
    (folder / "shard_0000008.npz").unlink()
    with pytest.raises(ValueError, match="8 of 10 teacher pairs"):
        read_teacher_pairs(folder)


def test_reflow_targets_and_times():
    z0, z1 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    x_t, v = reflow_targets(z0, z1, torch.tensor([0.25, 1.0]))
    assert torch.equal(v, z1) and x_t[0].eq(0.25).all() and x_t[1].eq(1.0).all()
    grid = draw_times(4000, "student_grid", 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert sorted(set(grid.tolist())) == [0.0, 0.25, 0.5, 0.75]
    shifted = draw_times(4000, "student_grid", 2, torch.Generator().manual_seed(0), torch.device("cpu"), student_shift=2.0)
    sampler = CascadeSampler(StageScalarFlow(SCHEDULE), SCHEDULE, SamplerConfig(method="ab2", steps=2, shift=2.0))
    assert sorted(set(shifted.tolist())) == sampler.stage_time_grid(0)[0][:-1].float().tolist() == [0.0, pytest.approx(1 / 3)]
    uniform = draw_times(20000, "uniform", 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01


class StageScalarFlow(nn.Module):
    """A stand-in student: v = c_k(u) x at stage k, c_k a quadratic in the stage's time u (learnt)."""

    prediction, in_channels = "v", 1

    def __init__(self, schedule: CascadeSchedule):
        super().__init__()
        self.schedule = schedule
        self.coefficients = nn.Parameter(torch.zeros(schedule.num_stages, 3))

    def stage_velocity(self, x: torch.Tensor, k: int, t: torch.Tensor) -> torch.Tensor:
        c = self.coefficients[k]
        return (c[0] + c[1] * t + c[2] * t**2).view(-1, 1, 1, 1) * x

    def forward(self, xs, timesteps, class_labels):
        out = []
        for x, timestep in zip(xs, timesteps):
            k = self.schedule.stage_sides.index(x.shape[-1])
            table = self.schedule.timestep_tables[k]
            out.append(self.stage_velocity(x, k, ((timestep.double() - table[0]) / (table[-1] - table[0])).float()))
        return out


def test_a_student_of_an_analytic_flow_reaches_the_teachers_endpoints():
    """Teacher: dx/dt = a_k x within stage k (exact end e^{a_k} z0). After reflow training the student's two
    AB2 steps a stage land within 1% of the teacher's move, from errors of 100% before training."""
    rates = [0.4, -0.3, 0.6, 0.2]
    seeds = list(range(64))
    noise = CascadeNoise.per_sample(SCHEDULE, seeds, 1, doubled=False)
    ends, x = [], noise.init
    for k, a in enumerate(rates):
        if k:
            x = SCHEDULE.transition(ends[-1], k, noise.transitions[k - 1])
        ends.append(math.exp(a) * x)
    starts = stage_starts(SCHEDULE, ends, seeds, 1)
    student = StageScalarFlow(SCHEDULE)
    labels = torch.zeros(len(seeds), dtype=torch.long)

    def relative_errors() -> list[float]:
        errors = []
        with torch.no_grad():
            for k in range(SCHEDULE.num_stages):
                landed = ab2(starts[k], lambda y, n, k=k: student.stage_velocity(y, k, torch.tensor([n / 2.0])), [0.5, 0.5])
                errors.append(float((landed - ends[k]).norm() / (ends[k] - starts[k]).norm()))
        return errors

    assert min(relative_errors()) > 0.99
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        loss, logs = reflow_loss(student, SCHEDULE, ends, labels, seeds, g, "uniform", 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert sorted(logs) == ["stage0", "stage1", "stage2", "stage3"]
    assert max(relative_errors()) < 0.01


def test_a_students_sampler_makes_exactly_its_recorded_rows(tmp_path, tiny_model):
    """Exported with its sampler, a student samples with it (no flags): steps x stages network rows an image."""
    recorded = {"method": "ab2", "steps": 2, "shift": 1.0, "guidance_scale": 1.0, "guidance_interval": None}
    export_released_format(tiny_model, CascadeSchedule(image_size=32), tmp_path / "student", sampler=recorded)
    loaded = load_pixelflow(tmp_path / "student" / "model.pt")
    assert loaded.sampler == recorded
    preset = {"method": "euler", "steps": 30, "shift": 1.0, "guidance_scale": 4.0}
    for overrides, rows in (([], 8.0), (["sampler.steps=1"], 4.0), (["sampler=euler30"], None)):
        config, _ = choose_sampler({**preset, "steps": 1} if overrides[:1] == ["sampler.steps=1"] else preset,
                                   loaded.sampler, overrides)
        if rows is None:  # a named preset wins over the record
            assert config == SamplerConfig.from_mapping(preset)
            continue
        out = tmp_path / f"samples_{rows}"
        path = generate(loaded, config, out, num_samples=6, batch_size=4, save_png=False)
        with np.load(path, allow_pickle=False) as data:
            assert json.loads(str(data["settings"]))["model_calls_per_image"] == rows


def test_bad_teachers_stop_with_the_problem_named(tmp_path, teacher, t2i_model):
    with pytest.raises(ValueError, match="needs a teacher"):
        load_teacher(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "missing" / "model.pt")
    with pytest.raises(ValueError, match="makes 32 px images but this run is set to 64"):
        load_teacher(teacher, 64)
    export_released_format(t2i_model, CascadeSchedule(image_size=32), tmp_path / "t2i",
                           text_encoder={"source": "t5", "max_length": 8})
    with pytest.raises(ValueError, match="text-to-image"):
        load_teacher(tmp_path / "t2i" / "model.pt")
    with pytest.raises(ValueError, match="less than one batch"):
        TeacherPairsDataModule(str(teacher), {"method": "euler", "steps": 1}, str(tmp_path / "p"), num_pairs=4, batch_size=8)


def test_student_settings_are_checked():
    model = build_model("Test/2", num_classes=10)
    with pytest.raises(ValueError, match="label_dropout must be 0"):
        DistillLitModule(model, CascadeSchedule(image_size=32), label_dropout=0.1)
    with pytest.raises(ValueError, match="student_steps"):
        DistillLitModule(model, CascadeSchedule(image_size=32), student_steps=0)
    with pytest.raises(ValueError, match="module.time"):
        DistillLitModule(model, CascadeSchedule(image_size=32), time="linear")
    with pytest.raises(ValueError, match="student_shift must be a number > 0"):
        DistillLitModule(model, CascadeSchedule(image_size=32), student_shift=0)
    sampler = DistillLitModule(model, CascadeSchedule(image_size=32), student_steps=1, student_shift=3).student_sampler()
    assert (sampler.method, sampler.steps, sampler.shift, sampler.guidance_scale) == ("ab2", 1, 3.0, 1.0)


def _distill(run_dir, steps, teacher, *extra):
    from pixelflow.training.launch import run_training

    overrides = ["experiment=mnist_distill", f"teacher={teacher}", "data.num_pairs=32", "data.pairs_batch_size=16"]
    return run_training(compose_config("train", overrides + tiny_train_overrides(run_dir, steps, [*extra])))


@pytest.mark.slow
def test_distillation_trains_exports_its_sampler_and_resumes_exactly(tmp_path, teacher):
    """Four steps in one go and two + two with a restart give the same student, optimizer and EMA."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _distill(straight, 4, teacher)
    _distill(resumed, 2, teacher)
    _distill(resumed, 4, teacher)
    _assert_same_state(straight / "checkpoints" / "step_0000004.ckpt", resumed / "checkpoints" / "step_0000004.ckpt")
    student = load_pixelflow(straight / "export" / "model.pt")
    assert student.sampler == {"method": "ab2", "steps": 2, "shift": 2.0, "guidance_scale": 1.0, "guidance_interval": None}
    meta = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["pixelflow"]
    assert meta["distillation"]["teacher"] == str(teacher) and meta["sampler"] == student.sampler


class StageConstantFlow(nn.Module):
    """A stand-in network whose velocity is a learnt constant per stage (guidance-free: both branches agree)."""

    prediction, in_channels, null_class = "v", 1, 10

    def __init__(self, schedule: CascadeSchedule, values: list[float]):
        super().__init__()
        self.schedule = schedule
        self.values = nn.Parameter(torch.tensor(values))

    def _one(self, x):
        return self.values[self.schedule.stage_sides.index(x.shape[-1])] * torch.ones_like(x)

    def forward(self, x, timestep, class_labels):
        return [self._one(v) for v in x] if isinstance(x, list) else self._one(x)


def test_consistency_distillation_learns_a_teachers_straight_flow():
    """A teacher of constant velocity c_k has straight trajectories, so its consistency function is
    x + (1 - t) c_k: the loss is zero exactly at the teacher's constants and training gets there."""
    from pixelflow.training.consistency import consistency_loss

    teacher = StageConstantFlow(SCHEDULE, [0.5, -0.2, 0.3, 0.1]).requires_grad_(False)
    images = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(64, dtype=torch.long)
    at_teacher = StageConstantFlow(SCHEDULE, teacher.values.tolist())
    loss, _ = consistency_loss(at_teacher, teacher, SCHEDULE, images, labels, torch.Generator().manual_seed(1), 8, 3.0)
    assert float(loss.detach()) < 1e-10
    student = StageConstantFlow(SCHEDULE, [0.0] * 4)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        loss, _ = consistency_loss(student, teacher, SCHEDULE, images, labels, g, 8, 3.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(student.values.detach(), teacher.values, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="must divide"):
        consistency_loss(student, teacher, SCHEDULE, images, labels, g, 7, 3.0)
