"""ADM npz / PNG folder reading and writing, named references, and the errors for bad inputs."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelflow.data.mnist import MNIST
from pixelflow.metrics.io import STATS_KEYS, EvaluationInputError, load_image_set, write_adm_npz
from pixelflow.metrics.references import MNIST_DEFAULT_NUM_REF, NAMED_REFERENCES, default_num_ref, mnist_images, resolve_reference
from pixelflow.sampling.samplers import to_uint8


def _images(n=5, h=6, w=7, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _all(image_set, batch_size=2, limit=None):
    return np.concatenate(list(image_set.batches(batch_size, limit)))


def test_adm_npz_roundtrip_with_labels_settings_and_stats(tmp_path):
    images, labels = _images(), np.array([3, 1, 4, 1, 5])
    rng = np.random.default_rng(1)
    stats = {k: rng.normal(size=shape) for k, shape in STATS_KEYS.items()}
    settings = {"method": "dopri5", "cfg": 2.4, "steps": [10, 10]}
    path = write_adm_npz(tmp_path / "ref.npz", images, labels, settings, stats)

    with np.load(path, allow_pickle=False) as raw:  # the plain ADM layout, readable by ADM's evaluator
        assert set(raw.files) == {"arr_0", "arr_1", "settings", *STATS_KEYS}
        assert raw["arr_0"].dtype == np.uint8 and raw["arr_0"].shape == (5, 6, 7, 3)
    got = load_image_set(path)
    assert got.shape == (5, 6, 7, 3) and len(got) == 5
    np.testing.assert_array_equal(_all(got), images)
    np.testing.assert_array_equal(_all(got, batch_size=2, limit=3), images[:3])
    np.testing.assert_array_equal(got.labels, labels)
    assert got.settings == settings
    for k in STATS_KEYS:
        np.testing.assert_array_equal(got.stats[k], stats[k])
    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_settings_written_by_plain_numpy_are_read(tmp_path):
    # sample.py stores its settings as a 0-d str array; a non-JSON string is kept verbatim
    np.savez(tmp_path / "a.npz", arr_0=_images(), settings=np.array(json.dumps({"cfg": 4.0})))
    np.savez(tmp_path / "b.npz", arr_0=_images(), settings=np.array("euler, 30 steps"))
    assert load_image_set(tmp_path / "a.npz").settings == {"cfg": 4.0}
    assert load_image_set(tmp_path / "b.npz").settings == "euler, 30 steps"
    assert load_image_set(tmp_path / "a.npz").labels is None


def test_grayscale_images_become_rgb(tmp_path):
    gray = _images(c=1)
    np.savez(tmp_path / "g.npz", arr_0=gray)
    np.testing.assert_array_equal(_all(load_image_set(tmp_path / "g.npz")), np.repeat(gray, 3, axis=-1))


def test_fortran_ordered_npz_is_read(tmp_path):
    images = _images()
    np.savez(tmp_path / "f.npz", arr_0=np.asfortranarray(images))
    np.testing.assert_array_equal(_all(load_image_set(tmp_path / "f.npz")), images)
    np.savez(tmp_path / "f32.npz", arr_0=np.asfortranarray(images.astype(np.float32)))
    with pytest.raises(EvaluationInputError, match="dtype float32; expected uint8"):
        load_image_set(tmp_path / "f32.npz")


def test_png_folder(tmp_path):
    images = _images(n=3, h=5, w=4)
    for i, im in enumerate(images[:2]):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    Image.fromarray(images[2, ..., 0]).save(tmp_path / "002.png")  # a grayscale PNG
    (tmp_path / "metrics.json").write_text("{}")  # non-PNG files are ignored
    got = load_image_set(tmp_path, num_workers=2)
    assert got.shape == (3, 5, 4, 3)
    expected = images.copy()
    expected[2] = images[2, ..., :1]
    np.testing.assert_array_equal(_all(got), expected)
    Image.fromarray(_images(n=1, h=9, w=9)[0]).save(tmp_path / "003.png")
    with pytest.raises(EvaluationInputError, match=r"003.png is 9x9 but 000.png is 4x5"):
        _all(load_image_set(tmp_path))


@pytest.mark.parametrize(("arrays", "message"), [
    ({"images": _images()}, r"keys \['images'\] but no 'arr_0'"),
    ({"arr_0": _images().astype(np.float32)}, r"dtype float32; expected uint8"),
    ({"arr_0": _images().transpose(0, 3, 1, 2)}, r"looks like NCHW"),
    ({"arr_0": _images()[..., 0]}, r"expected 4 dims \(N, H, W, 3\)"),
    ({"arr_0": _images(), "arr_1": np.arange(4)}, r"'arr_1' has shape \(4,\).*expected int labels of shape \(5,\)"),
    ({"arr_0": _images(), "mu": np.zeros(2048)}, r"lacks \['sigma', 'mu_s', 'sigma_s'\]"),
    ({"arr_0": _images(), "arr_1": np.array([None] * 5, dtype=object)}, r"no pickled objects"),
])
def test_bad_npz_layout_is_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EvaluationInputError, match=message):
        load_image_set(tmp_path / "bad.npz")


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(EvaluationInputError, match="does not exist"):
        load_image_set(tmp_path / "nope.npz")
    with pytest.raises(EvaluationInputError, match="contains no .png files"):
        load_image_set(tmp_path)
    (tmp_path / "x.pt").write_bytes(b"\0")
    with pytest.raises(EvaluationInputError, match="neither a .npz file nor a folder"):
        load_image_set(tmp_path / "x.pt")
    write_adm_npz(tmp_path / "ok.npz", _images(n=50, h=32, w=32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:20000])
    with pytest.raises(EvaluationInputError, match="not a readable .npz file"):
        load_image_set(tmp_path / "cut.npz")


def test_write_rejects_mismatched_labels(tmp_path):
    with pytest.raises(EvaluationInputError, match=r"labels have shape \(3,\); expected \(5,\)"):
        write_adm_npz(tmp_path / "x.npz", _images(), labels=np.arange(3))


def test_named_mnist_reference_matches_training_images():
    ref = resolve_reference("mnist_test")
    assert ref.shape == (10000, 32, 32, 3) and ref.stats is None
    first = next(ref.batches(16))
    training_images = torch.stack([MNIST("test")[i][0] for i in range(16)])
    np.testing.assert_array_equal(first, to_uint8(training_images).numpy())
    np.testing.assert_array_equal(ref.labels, mnist_images("test")[1])


def test_unknown_named_reference_lists_known_ones():
    with pytest.raises(EvaluationInputError) as err:
        resolve_reference("mnist_tset")
    assert all(name in str(err.value) for name in NAMED_REFERENCES)


def test_default_reference_size_is_500_for_named_mnist_and_all_for_paths():
    assert default_num_ref("mnist_test", "auto") == MNIST_DEFAULT_NUM_REF == 500
    assert default_num_ref("/data/ref.npz", "auto") is None
    assert default_num_ref("mnist_test", None) is None and default_num_ref("mnist_test", 12) == 12
