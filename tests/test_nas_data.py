import pickle

import numpy as np
import pytest

from nasc.errors import NascError
from nasc.search.nas.data import load_cifar10, load_data, load_folder, resize


def test_digits_shapes_split_and_normalisation():
    d = load_data("digits", resolution=16, seed=0)
    assert d.train_x.shape[1:] == (3, 16, 16) and d.train_x.dtype == np.float32
    assert len(d.train_y) + len(d.val_y) == 1797 and d.num_classes == 10
    assert set(np.unique(d.val_y)) == set(range(10))  # stratified
    np.testing.assert_allclose(d.train_x.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    again = load_data("digits", resolution=16, seed=0)
    np.testing.assert_array_equal(d.val_x, again.val_x)


def test_resize_bilinear_constant_and_identity():
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize(x, 8), x)
    np.testing.assert_allclose(resize(np.ones((1, 1, 8, 8)), 32), 1.0)
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(16, 16), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize(x, 16), want.numpy(), atol=1e-6)


def _write_cifar(root, n_per_batch=20, batches=2):
    rng = np.random.default_rng(0)
    for b in range(1, batches + 1):
        d = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"labels": list(rng.integers(0, 10, n_per_batch))}
        (root / f"data_batch_{b}").write_bytes(pickle.dumps(d))


def test_cifar10_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _write_cifar(root)
    d = load_cifar10(tmp_path, resolution=16)
    assert d.train_x.shape[1:] == (3, 16, 16) and len(d.train_y) + len(d.val_y) == 40
    assert load_data(f"cifar10:{root}").resolution == 32
    with pytest.raises(NascError, match="no CIFAR-10 python batches"):
        load_cifar10(tmp_path / "nothing")
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(NascError, match="data_batch_3"):
        load_cifar10(root)


def test_image_folder_png_and_npy(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for cls, colour in (("cat", 200), ("dog", 30)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            img = np.full((12, 10, 3), colour, np.uint8) + rng.integers(0, 20, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
        np.save(tmp_path / cls / "extra.npy", np.full((8, 8), colour, np.uint8))
    d = load_folder(tmp_path, resolution=8)
    assert d.num_classes == 2 and len(d.train_y) + len(d.val_y) == 12
    assert d.train_x.shape[1:] == (3, 8, 8)
    # class 0 (cat) is bright, class 1 (dog) dark, after the same normalisation
    assert d.train_x[d.train_y == 0].mean() > d.train_x[d.train_y == 1].mean()


def test_image_folder_with_train_val_split(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            np.save(tmp_path / split / cls / "0.npy", np.zeros((4, 4, 3), np.uint8))
    d = load_data(f"folder:{tmp_path}", resolution=4)
    assert len(d.train_y) == 2 and len(d.val_y) == 2


def test_bad_specs(tmp_path):
    with pytest.raises(NascError, match="data spec"):
        load_data("mnist")
    with pytest.raises(NascError, match="not found"):
        load_data(f"folder:{tmp_path / 'x'}")
    (tmp_path / "only").mkdir()
    with pytest.raises(NascError, match="two class"):
        load_folder(tmp_path)
