import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import export_released_format, load_pixelflow
from pixelflow.sampling.generate import assemble, finished_indices, generate
from pixelflow.sampling.samplers import SamplerConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tmp_path, tiny_model):
    return export_released_format(tiny_model, CascadeSchedule(image_size=32), tmp_path / "ckpt", [str(i) for i in range(10)])


def sample_cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def test_images_do_not_depend_on_batch_size(tmp_path, ckpt):
    loaded = load_pixelflow(ckpt)
    config = SamplerConfig(steps=2, guidance_scale=2.0)
    a = np.load(generate(loaded, config, tmp_path / "a", 6, batch_size=6, save_png=False))
    b = np.load(generate(loaded, config, tmp_path / "b", 6, batch_size=4, save_png=False))
    assert np.array_equal(a["arr_1"], b["arr_1"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # float ulps may flip a rounding


def test_sample_cli_end_to_end(tmp_path, ckpt):
    out = tmp_path / "out"
    proc = sample_cli(f"ckpt={ckpt}", f"out_dir={out}", "num_samples=12", "batch_size=5", "sampler.steps=[1,1,1,2]")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    data = np.load(out / "samples.npz", allow_pickle=False)
    assert data["arr_0"].shape == (12, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [i % 10 for i in range(12)]
    assert '"steps": [1, 1, 1, 2]' in str(data["settings"])
    assert len(list((out / "images").glob("*.png"))) == 12 and (out / "grid.png").is_file()


@pytest.mark.slow
def test_sample_cli_compiled_gives_the_eager_images(tmp_path, tiny_model):
    ckpt = export_released_format(tiny_model, CascadeSchedule(image_size=32, num_stages=2), tmp_path / "ckpt")  # 2 shapes
    args = (f"ckpt={ckpt}", "num_samples=3", "batch_size=2", "sampler.steps=2", "sampler.guidance_scale=1", "save_png=false")
    for name, extra in (("eager", []), ("compiled", ["compile=true"])):
        log = sample_cli(*args, f"out_dir={tmp_path / name}", *extra).communicate(timeout=600)[0]
        assert (tmp_path / name / "samples.npz").is_file(), log
    assert "compiled the network for 4 sampling shapes" in log  # batches of 2 and the last 1, at both stages
    eager, compiled = (np.load(tmp_path / n / "samples.npz")["arr_0"].astype(int) for n in ("eager", "compiled"))
    assert eager.shape == (3, 32, 32, 3) and np.abs(eager - compiled).max() <= 1  # float ulps may flip a rounding


def test_sample_cli_picks_an_ema_rate_of_an_export(tmp_path, tiny_model):
    schedule, out = CascadeSchedule(image_size=32), tmp_path / "out"
    export_released_format(tiny_model, schedule, tmp_path / "export", ema_decays=[0.9, 0.5])
    export_released_format(tiny_model, schedule, tmp_path / "export", filename="model_ema0.5.pt", ema_decays=[0.9, 0.5])
    proc = sample_cli(f"ckpt={tmp_path / 'export' / 'model.pt'}", "ema=0.5", f"out_dir={out}", "num_samples=2", "sampler.steps=1")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert str(tmp_path / "export" / "model_ema0.5.pt") in str(np.load(out / "samples.npz")["settings"])
    proc = sample_cli(f"ckpt={tmp_path / 'export' / 'model.pt'}", "ema=0.7", f"out_dir={out}")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "no export of EMA rate 0.7" in log and "Traceback" not in log


def test_sample_cli_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = sample_cli(f"ckpt={tmp_path}/missing.ckpt", f"out_dir={tmp_path}/o")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "does not exist" in log and "Traceback" not in log


@pytest.mark.slow
def test_killed_generation_resumes_without_gaps_or_duplicates(tmp_path, ckpt):
    out, n = tmp_path / "out", 40
    args = (f"ckpt={ckpt}", f"out_dir={out}", f"num_samples={n}", "batch_size=2", "sampler.steps=3", "save_png=false")
    proc = sample_cli(*args)
    deadline = time.time() + 240
    while len(list((out / "shards").glob("shard_*.npz"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "generation ended before it could be interrupted"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((out / "shards").glob("shard_*.npz")))
    assert 3 <= partial < n // 2 and not (out / "samples.npz").exists()
    resumed = sample_cli(*args)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resuming" in log
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape[0] == n and data["arr_1"].tolist() == [i % 10 for i in range(n)]
    # Identical to an uninterrupted run.
    fresh = sample_cli(*args[:1], f"out_dir={tmp_path}/fresh", *args[2:])
    assert fresh.wait(timeout=300) == 0
    assert np.array_equal(np.load(tmp_path / "fresh" / "samples.npz")["arr_0"], data["arr_0"])


@pytest.mark.slow
def test_two_processes_give_the_same_samples_as_one(tmp_path, ckpt):
    common = (f"ckpt={ckpt}", "num_samples=10", "sampler.steps=2", "save_png=false", "accelerator=cpu")
    two = sample_cli(*common, f"out_dir={tmp_path}/two", "batch_size=2", "devices=2")
    one = sample_cli(*common, f"out_dir={tmp_path}/one", "batch_size=3")
    for proc in (two, one):
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log
    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("one", "two"))
    assert np.array_equal(a["arr_1"], b["arr_1"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


def test_a_batch_that_will_not_fit_is_refused_up_front_with_the_fix(tmp_path, ckpt):
    loaded = load_pixelflow(ckpt)
    with pytest.raises(ValueError, match=r"batch_size=64 .* use batch_size=\d+"):
        generate(loaded, SamplerConfig(steps=1), tmp_path / "o", 64, batch_size=64, device_memory_gib=0.65)
    assert not (tmp_path / "o" / "shards").exists() or not any((tmp_path / "o" / "shards").iterdir())


def test_compile_comes_after_the_memory_check_and_covers_the_batches_left(tmp_path, ckpt, monkeypatch):
    import pixelflow.sampling.generate as gen

    compiled = []
    monkeypatch.setattr(gen, "compile_loaded", lambda loaded, configs, sizes, *a: compiled.append(set(sizes)) or (loaded, 0.0))
    loaded = load_pixelflow(ckpt)
    with pytest.raises(ValueError, match="batch_size=64"):
        generate(loaded, SamplerConfig(steps=1), tmp_path / "o", 64, batch_size=64, device_memory_gib=0.65, compile=True)
    assert compiled == []  # refused before minutes of compiling
    generate(loaded, SamplerConfig(steps=1), tmp_path / "p", 5, batch_size=2, save_png=False, compile=True)
    assert compiled == [{2, 1}]


def test_assemble_holds_at_most_one_copy_of_the_images(tmp_path):
    """Shards are streamed into a memory map: traced (heap) memory stays far below the image bytes (50 MB here;
    np.savez copies the map into the archive in 16 MiB chunks)."""
    import tracemalloc

    n, side = 1024, 128
    rng = np.random.default_rng(0)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    order = rng.permutation(n)
    for start in range(0, n, 32):  # shards hold scattered indices, as after a resume
        idx = np.sort(order[start:start + 32])
        np.savez(shard_dir / f"shard_{idx[0]:07d}.npz", indices=idx, labels=idx % 10,
                 images=(idx[:, None, None, None] % 251 * np.ones((1, side, side, 3))).astype(np.uint8))
    image_bytes = n * side * side * 3
    tracemalloc.start()
    path = assemble(tmp_path, n, {"k": 1})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.5 * image_bytes  # the old concatenate + reorder held 2x the image bytes
    data = np.load(path, allow_pickle=False)
    assert np.array_equal(data["arr_0"][:, 0, 0, 0], np.arange(n) % 251) and data["arr_1"].tolist() == [i % 10 for i in range(n)]
    assert not (shard_dir / "assembling.npy").exists()


def test_a_resumed_run_skips_killed_writes_and_regenerates_damaged_shards(tmp_path, ckpt):
    """A shard's temporary never matches the shard glob; what a kill leaves (a hidden .partial) and a shard damaged
    from outside (not a zip) are both cleared, and the run makes exactly the missing samples."""
    out = tmp_path / "out"
    generate(load_pixelflow(ckpt), SamplerConfig(steps=2), out, 6, 2, save_png=False)
    shards = out / "shards"
    assert not list(shards.glob(".*"))  # no temporaries left behind by finished writes
    first = np.load(out / "samples.npz")["arr_0"]
    (out / "samples.npz").unlink()
    (shards / ".shard_0000002.npz.k1ll3d.partial").write_bytes(b"PK\x03\x04 half a zip")
    (shards / "shard_0000004.npz").write_bytes(b"PK\x03\x04 not a zip any more")
    assert finished_indices(shards) == {0, 1, 2, 3}
    assert not list(shards.glob(".*")) and not (shards / "shard_0000004.npz").exists()
    generate(load_pixelflow(ckpt), SamplerConfig(steps=2), out, 6, 2, save_png=False)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], first)
