import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icm_lora.thin_conv import ToOneChannel


@pytest.mark.parametrize("channels,kernel_size,length", [(4, 7, 50), (1, 3, 9), (3, 1, 5), (2, 5, 4)])
def test_matches_conv1d_values_and_gradients(channels, kernel_size, length):
    torch.manual_seed(0)
    thin = ToOneChannel(channels, kernel_size).double()
    x = torch.randn(3, channels, length, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(x, thin.weight, thin.bias, padding=kernel_size // 2)
    out = thin(x)
    assert out.shape == ref.shape == (3, 1, length)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, thin.weight, thin.bias), grad)
    theirs = torch.autograd.grad(ref, (x, thin.weight, thin.bias), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *t: thin(t[0]), (x,))


def test_same_parameters_and_state_dict_as_conv1d():
    torch.manual_seed(1)
    conv = nn.Conv1d(4, 1, 7, 1, 3)
    torch.manual_seed(1)
    thin = ToOneChannel(4, 7)
    assert isinstance(thin, nn.Conv1d)
    assert conv.state_dict().keys() == thin.state_dict().keys()
    for key, value in conv.state_dict().items():
        assert torch.equal(value, thin.state_dict()[key])  # same initialisation too
    x = torch.randn(2, 4, 33)
    torch.testing.assert_close(thin(x), conv(x), atol=1e-5, rtol=1e-5)


def test_parameter_gradients_are_right_when_the_input_needs_none():
    torch.manual_seed(2)
    thin = ToOneChannel(2, 3)
    conv = nn.Conv1d(2, 1, 3, 1, 1)
    conv.load_state_dict(thin.state_dict())
    x = torch.randn(2, 2, 10)  # no grad: backward skips the input gradient, the parameters' must not change
    grad = torch.randn(2, 1, 10)
    thin(x).backward(grad)
    conv(x).backward(grad)
    assert x.grad is None
    torch.testing.assert_close(thin.weight.grad, conv.weight.grad)
    torch.testing.assert_close(thin.bias.grad, conv.bias.grad)


def test_bf16_input_stays_bf16_and_close():
    thin = ToOneChannel(4, 7)
    x = torch.randn(2, 4, 64)
    out = thin(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), thin(x), atol=0.1, rtol=0.05)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        ToOneChannel(4, 6)
