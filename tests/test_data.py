import pytest
import torch

from fxkd.data import take_samples
from fxkd.errors import DataError, EmptyLoaderError


def test_takes_from_tuples_dicts_and_tensors():
    x = torch.randn(10, 3)
    pairs = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(6))]
    assert torch.equal(take_samples(pairs, 7), x[:7])
    dicts = [{"label": torch.zeros(5), "image": x[:5]}, {"label": torch.zeros(5), "image": x[5:]}]
    assert torch.equal(take_samples(dicts, 10, key="image"), x)
    assert torch.equal(take_samples(x, 3), x[:3])


def test_fewer_samples_warns_and_uses_what_there_is():
    with pytest.warns(UserWarning, match="yielded 4"):
        out = take_samples([torch.randn(4, 2)], 10)
    assert out.shape == (4, 2)


def test_empty_loader_raises():
    with pytest.raises(EmptyLoaderError, match="no samples"):
        take_samples([], 10)


def test_non_tensor_and_shape_mismatch_raise():
    with pytest.raises(DataError, match="not a tensor"):
        take_samples([("a", "b")], 3)
    with pytest.raises(DataError, match="disagree"):
        take_samples([torch.randn(2, 3), torch.randn(2, 4)], 4)
    with pytest.raises(DataError, match="input_key"):
        take_samples([{"a": torch.randn(2)}], 2, key="image")


def test_seeded_shuffling_is_reproducible():
    data = torch.utils.data.TensorDataset(torch.arange(100.0)[:, None])
    loader = torch.utils.data.DataLoader(data, batch_size=10, shuffle=True)
    a, b = take_samples(loader, 20, seed=3), take_samples(loader, 20, seed=3)
    assert torch.equal(a, b)
