import pytest
import torch

from pyro_svae.encoders import CNNEncoder, MLPEncoder, make_encoder


def test_cnn_encoder_maps_images_to_features_and_keeps_batch_dims():
    encoder = CNNEncoder((1, 28, 28), channels=(8, 16), hidden_dim=32)
    assert encoder.out_features == 32
    assert encoder(torch.rand(5, 1, 28, 28)).shape == (5, 32)
    assert encoder(torch.rand(3, 5, 1, 28, 28)).shape == (3, 5, 32)
    odd = CNNEncoder((3, 9, 7), channels=(4,), hidden_dim=6)  # odd sizes, colour
    assert odd(torch.rand(2, 3, 9, 7)).shape == (2, 6)


def test_cnn_encoder_sees_local_structure_with_fewer_weights_than_the_mlp():
    cnn = CNNEncoder((1, 28, 28), channels=(8, 16), hidden_dim=64)
    mlp = MLPEncoder((1, 28, 28), hidden_dim=64, num_layers=2)
    assert sum(p.numel() for p in cnn.parameters()) < sum(p.numel() for p in mlp.parameters())
    # shifting the input by one pixel changes the features (not invariant) but far less than noise does
    image = torch.zeros(1, 1, 28, 28)
    image[..., 10:18, 12:16] = 1.0
    shifted = image.roll(1, dims=-1)
    noise = torch.rand_like(image)
    with torch.no_grad():
        base = cnn(image)
        assert 0 < float((cnn(shifted) - base).norm()) < float((cnn(noise) - base).norm())


def test_every_cnn_weight_receives_a_gradient():
    encoder = CNNEncoder((1, 12, 12), channels=(4, 8), hidden_dim=10)
    encoder(torch.rand(4, 1, 12, 12)).pow(2).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in encoder.parameters())


def test_make_encoder_by_name_and_validation():
    assert isinstance(make_encoder("cnn", (1, 8, 8), hidden_dim=5), CNNEncoder)
    assert isinstance(make_encoder("mlp", (1, 8, 8), hidden_dim=5), MLPEncoder)
    with pytest.raises(ValueError, match="unknown encoder 'resnet'"):
        make_encoder("resnet", (1, 8, 8))
    with pytest.raises(ValueError, match=">= 1"):
        CNNEncoder((1, 8, 8), channels=())
