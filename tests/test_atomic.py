import errno
import fnmatch
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelflow.atomic import (
    DiskFullError,
    append_line_atomic,
    atomic_save_figure,
    atomic_save_npz,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    partial_path,
)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["shard_0000001.npz", "shard_0000016.tmp.npz", "last.ckpt", "hpc_ckpt_1.ckpt", "step_0000100.ckpt",
           "metrics.jsonl", "model.pt", "model.safetensors", "config.yaml", "samples.npz", "features.tar.gz",
           "cell_euler_30.json", "wandb_id.txt", "README", "a.b.c.d"]


def reader_patterns(name: str) -> list[str]:
    """Every glob ``A*B`` that finds ``name``: A a prefix of the name, B an extension it ends with (from any of its
    dots), one of them not empty (``*`` alone matches every file, and no reader of one kind of file uses it)."""
    prefixes = [""] + [name[:k] for k in range(1, len(name) + 1)]
    extensions = [""] + [name[k:] for k in range(len(name)) if name[k] == "."]
    patterns = (f"{a}*{b}" for a in prefixes for b in extensions if a or b)
    return [p for p in patterns if fnmatch.fnmatchcase(name, p)]


@pytest.mark.parametrize("name", TARGETS)
def test_temporary_names_match_no_reader_pattern_of_the_target(name, tmp_path):
    patterns = reader_patterns(name)
    assert f"{name[:6]}*" in patterns and any(p.startswith("*.") for p in patterns) == ("." in name)
    for _ in range(50):
        partial = partial_path(tmp_path / name)
        assert partial.parent == tmp_path and partial.name.startswith(".") and partial.name.endswith(".partial")
        # fnmatch matches hidden names (as pathlib's glob does); glob.glob and Path.glob see the real directory
        assert not [p for p in patterns if fnmatch.fnmatchcase(partial.name, p)]
    partial.touch()
    (tmp_path / name).touch()
    for pattern in patterns:
        assert [p.name for p in tmp_path.glob(pattern)] == [name], pattern
        assert glob.glob(str(tmp_path / pattern)) == [str(tmp_path / name)], pattern


def test_a_target_with_the_temporary_ending_is_refused(tmp_path):
    with pytest.raises(ValueError, match="may not end in '.partial'"):
        atomic_write_text(tmp_path / "x.partial", "a")


def test_each_writer_writes_exactly_the_target(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_save_npz(tmp_path / "shard_1", x=np.arange(3))  # no .npz appended, as np.savez would
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with np.load(tmp_path / "shard_1") as data:
        assert data["x"].tolist() == [0, 1, 2]
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "m.pt", "shard_1"]


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    atomic_save_figure(figure, tmp_path / "plot.png")
    first = (tmp_path / "plot.png").read_bytes()
    assert first.startswith(b"\x89PNG")

    class Failing(Figure):
        def savefig(self, fname, **kwargs):
            fname.write(b"\x89PNG half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save_figure(Failing(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_new_files_get_the_permissions_open_would_give(tmp_path):
    atomic_write_text(tmp_path / "atomic.txt", "a")
    (tmp_path / "plain.txt").write_text("a")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_a_failing_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, "w") as f:
            f.write("new, half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_append_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'wb' or 'w'"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_append_line_adds_one_line_and_refuses_line_breaks_and_cut_files(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_line_atomic(log, json.dumps({"step": 1}))
    append_line_atomic(log, json.dumps({"step": 2}))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    with pytest.raises(ValueError, match="line break"):
        append_line_atomic(log, "a\nb")
    log.write_text('{"step": 1}\n{"ste')
    with pytest.raises(ValueError, match="does not end with a newline"):
        append_line_atomic(log, "{}")


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_disk_full_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch, where):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "fsync":
        def fsync(fd):
            raise no_space
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(DiskFullError) as caught:
            atomic_torch_save({"step": 2}, target)
    else:
        with pytest.raises(DiskFullError) as caught:
            with atomic_write(target) as f:
                f.write(b"part of step 2")
                raise no_space
    message = str(caught.value)
    assert "disk full" in message and str(target) in message and f"in {tmp_path.resolve()}" in message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert caught.value.__cause__ is no_space
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# --------------------------------------------------------------------------- kills in the middle of writes

WRITER = r"""
import json, sys
from pathlib import Path
import numpy as np
from pixelflow.atomic import append_line_atomic, atomic_save_npz
kind, target, version = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
data = np.empty(4_000_000, dtype=np.int32)  # 16 MB a version
while True:
    version += 1
    print("begin", version, flush=True)
    if kind == "npz":
        data.fill(version)
        atomic_save_npz(target, data=data, version=np.array(version))
    else:
        append_line_atomic(target, json.dumps({"n": version, "pad": "x" * 60}))
    print("done", version, flush=True)
"""


def _read_version(kind: str, target: Path) -> int:
    """The version the target holds, checking that it is complete."""
    if kind == "npz":
        with np.load(target, allow_pickle=False) as f:
            version, data = int(f["version"]), f["data"]
        assert data.shape == (4_000_000,) and data.min() == data.max() == version
        return version
    records = [json.loads(line) for line in target.read_text().splitlines()]  # a cut last line would not parse
    assert [r["n"] for r in records] == list(range(1, len(records) + 1))
    return len(records)


@pytest.mark.slow
@pytest.mark.parametrize("kind, kills", [("npz", 30), ("jsonl", 20)])
def test_sigkill_during_writes_leaves_the_previous_or_the_new_complete_file(tmp_path, kind, kills):
    """A writer rewrites the target in a loop and is SIGKILLed at a random moment, again and again: after every
    kill the target is complete and holds the last finished version or the one in progress, and the readers'
    globs see nothing else."""
    target = tmp_path / ("shard_0000000.npz" if kind == "npz" else "metrics.jsonl")
    if kind == "npz":
        atomic_save_npz(target, data=np.zeros(4_000_000, dtype=np.int32), version=np.array(0))
    else:  # about 8 MB to rewrite on every append
        target.write_text("".join(json.dumps({"n": n, "pad": "x" * 60}) + "\n" for n in range(1, 100_001)))
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    interrupted = 0
    for _ in range(kills):
        before = _read_version(kind, target)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target), str(before)], stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout.readline().split() == ["begin", str(before + 1)]
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=60)[0].split("\n")
        assert proc.returncode == -signal.SIGKILL
        begun = [before + 1] + [int(line.split()[1]) for line in out if line.startswith("begin")]
        done = [int(line.split()[1]) for line in out if line.startswith("done")]
        finished = max(done, default=before)
        assert _read_version(kind, target) in {finished, max(begun)}
        leftovers = [p for p in tmp_path.iterdir() if p != target]
        assert all(p.name.startswith(f".{target.name}.") and p.name.endswith(".partial") for p in leftovers)
        assert list(tmp_path.glob("shard_*.npz" if kind == "npz" else "*.jsonl")) == [target]
        interrupted += bool(leftovers)
        for p in leftovers:
            p.unlink()
    assert interrupted >= kills // 3  # most kills landed inside a write (the writer does little else)
