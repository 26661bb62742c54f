"""DIN and DCNv2: output shapes, gradients, use of the user vector and of the history."""
import pytest
import torch

from models.dcnv2 import DCNv2
from models.din import DIN
from models.layers import UNKNOWN_RATING

N_ITEMS, N_GENRES = 30, 5


def _vocab():
    genres = torch.zeros(N_ITEMS + 1, 2, dtype=torch.long)
    genres[1:, 0] = torch.arange(N_ITEMS) % N_GENRES + 1
    return genres


def _batch(b=6, length=7):
    torch.manual_seed(1)
    hist = torch.randint(1, N_ITEMS + 1, (b, length))
    hist[:, :2] = 0  # left padding
    rating = torch.randint(1, 6, (b, length)) * (hist > 0)
    rating[0, 3] = UNKNOWN_RATING
    return {"item": torch.randint(1, N_ITEMS + 1, (b,)), "hist": hist, "hist_rating": rating}


@pytest.mark.parametrize("cls,kwargs", [
    (DIN, dict(activation="dice")), (DIN, dict(activation="prelu", attention_units=(8,))),
    (DCNv2, dict(structure="parallel")), (DCNv2, dict(structure="stacked", low_rank=4))])
def test_shapes_gradients_and_inputs_matter(cls, kwargs):
    torch.manual_seed(0)
    model = cls(N_ITEMS, _vocab(), N_GENRES, user_vec_dim=4, embed_dim=8, **kwargs)
    batch = _batch()
    vec = torch.randn(6, 4, requires_grad=True)
    logits = model(batch, vec)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert vec.grad.abs().sum() > 0
    assert model.item.items.weight.grad.abs().sum() > 0
    assert model.rating.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        base = model(batch, vec)
        assert not torch.allclose(base, model(batch, vec + 1.0))
        other = dict(batch, hist=torch.flip(batch["hist"], [0]))
        assert not torch.allclose(base, model(other, vec))
        # padded history positions do not count, whatever their rating says
        padded = dict(batch, hist_rating=batch["hist_rating"].clone())
        padded["hist_rating"][:, :2] = 5
        assert torch.allclose(base, model(padded, vec), atol=1e-6)


@pytest.mark.parametrize("cls", [DIN, DCNv2])
def test_user_vector_required_when_configured(cls):
    model = cls(N_ITEMS, _vocab(), N_GENRES, user_vec_dim=4)
    with pytest.raises(ValueError):
        model(_batch(), None)
    plain = cls(N_ITEMS, _vocab(), N_GENRES)
    assert plain(_batch()).shape == (6,)
