"""HybridExpertAdaptor: shapes, softmax gates, gradients to shared and specific experts."""
import pytest
import torch

from models.adaptor import HybridExpertAdaptor


def test_shapes_gates_and_gradients():
    torch.manual_seed(0)
    adaptor = HybridExpertAdaptor(in_dim=8, out_dim=4, kinds=2, shared_experts=2,
                                  specific_experts=3, hidden_dim=16, dropout=0.0)
    a, b = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    out = adaptor([a, b])
    assert out.shape == (5, 8) and adaptor.out_dim == 8
    gates = adaptor.gate_weights([a, b])
    assert [g.shape for g in gates] == [(5, 5), (5, 5)]
    assert torch.allclose(gates[0].sum(-1), torch.ones(5))
    out.sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adaptor.shared.parameters())
    for kind in range(2):
        assert all(p.grad.abs().sum() > 0 for p in adaptor.specific[kind].parameters())


def test_kind_outputs_use_their_own_specific_experts():
    torch.manual_seed(0)
    adaptor = HybridExpertAdaptor(in_dim=8, out_dim=4, kinds=2, dropout=0.0).eval()
    x = torch.randn(3, 8)
    out = adaptor([x, x])
    assert not torch.allclose(out[:, :4], out[:, 4:])  # same input, different experts/gates


def test_wrong_number_of_inputs():
    adaptor = HybridExpertAdaptor(in_dim=8, out_dim=4, kinds=1)
    with pytest.raises(ValueError):
        adaptor([torch.randn(2, 8), torch.randn(2, 8)])
