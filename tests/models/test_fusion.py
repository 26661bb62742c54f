"""AttentionFusion: shapes, gradients, masking, the empty-user vector."""
import pytest
import torch

from models.fusion import AttentionFusion


def _inputs(b=4, k=3, e=16):
    torch.manual_seed(0)
    return (torch.randn(b, k, e), torch.ones(b, k, dtype=torch.bool), torch.randn(b, e),
            torch.ones(b, dtype=torch.bool))


def test_shape_and_gradients_reach_every_input():
    fusion = AttentionFusion(text_dim=16, k=3, hidden_dim=8, heads=2, dropout=0.0)
    parts, pmask, casc, cmask = _inputs()
    parts.requires_grad_(True)
    casc.requires_grad_(True)
    out = fusion(parts, pmask, casc, cmask)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert parts.grad.abs().sum() > 0 and casc.grad.abs().sum() > 0
    assert fusion.project.weight.grad.abs().sum() > 0 and fusion.slot.grad.abs().sum() > 0


def test_masked_slots_do_not_change_the_output():
    fusion = AttentionFusion(text_dim=16, k=3, hidden_dim=8, heads=2, dropout=0.0).eval()
    parts, pmask, casc, cmask = _inputs()
    pmask[:, 2] = False
    before = fusion(parts, pmask, casc, cmask)
    parts2 = parts.clone()
    parts2[:, 2] = 100.0  # garbage in a masked slot
    assert torch.allclose(before, fusion(parts2, pmask, casc, cmask), atol=1e-6)
    pmask[:, 1] = True
    parts2[:, 1] += 1.0  # an unmasked slot does matter
    assert not torch.allclose(before, fusion(parts2, pmask, casc, cmask))


def test_user_without_any_summary_gets_the_learned_empty_vector():
    fusion = AttentionFusion(text_dim=16, k=3, hidden_dim=8, heads=2, dropout=0.0).eval()
    parts, pmask, casc, cmask = _inputs(b=2)
    pmask[1] = False
    cmask[1] = False
    with torch.no_grad():
        fusion.empty.fill_(0.5)
    out = fusion(parts, pmask, casc, cmask)
    assert torch.allclose(out[1], torch.full((8,), 0.5)) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    # partitions without a cascaded summary are still fused (not the empty vector)
    cmask[0] = False
    assert not torch.allclose(fusion(parts, pmask, casc, cmask)[0], torch.full((8,), 0.5))


def test_more_slots_than_k_is_an_error():
    fusion = AttentionFusion(text_dim=16, k=2, hidden_dim=8, heads=2)
    parts, pmask, casc, cmask = _inputs(k=3)
    with pytest.raises(ValueError):
        fusion(parts, pmask, casc, cmask)
