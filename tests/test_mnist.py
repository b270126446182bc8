import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from pixelflow.data.mnist import MNIST, NumpyOnlyUnpickler, UnsafePickleError, load_mnist_arrays


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/pixelflow_pwned",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump((np.zeros(3), Exploit()), fh)
    with pytest.raises(UnsafePickleError, match="refusing to load global (posix|os).system"):
        load_mnist_arrays.__wrapped__(str(path))
    assert not os.path.exists("/tmp/pixelflow_pwned")


def test_restricted_unpickler_allows_numpy_arrays(tmp_path):
    path = tmp_path / "ok.pkl"
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    path.write_bytes(pickle.dumps(arrays))
    with open(path, "rb") as fh:
        loaded = NumpyOnlyUnpickler(fh).load()
    assert all(np.array_equal(a, b) for a, b in zip(arrays, loaded))


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pkl.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_mnist_arrays.__wrapped__(str(path))


def test_mnist_splits_shapes_and_range():
    arrays = load_mnist_arrays()
    assert {k: len(v[1]) for k, v in arrays.items()} == {"train": 50000, "valid": 10000, "test": 10000}
    data = MNIST("test", image_size=32)
    image, label = data[0]
    assert image.shape == (3, 32, 32) and 0 <= label <= 9
    assert image.min() == -1 and image.max() <= 1
    assert (image[:, :2] == -1).all()  # zero padding (black) around the 28 px digit
    digit = torch.from_numpy(arrays["test"][0][0]).float().div(127.5).sub(1.0)
    assert torch.equal(image[:, 2:30, 2:30], digit.expand(3, -1, -1))  # the pixel levels scaled to [-1, 1]
    assert data.pixels.dtype == torch.uint8 and data.pixels.shape == (10000, 1, 32, 32)  # kept small in memory
    assert np.bincount(data.labels.numpy()).min() > 800


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        MNIST("dev")
