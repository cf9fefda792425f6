import pytest
import torch

from lightning_compress.demo import MLP, PlainCNN, ResidualCNN


@pytest.mark.parametrize("model", [ResidualCNN(width=8), PlainCNN(width=8), MLP(hidden=(16, 8))])
def test_models_map_digits_to_ten_logits(model, tiny_input):
    assert model(tiny_input).shape == (4, 10)


def test_residual_cnn_stage_names_and_widths():
    model = ResidualCNN(width=8, depth=2, num_stages=3)
    names = dict(model.named_modules())
    for name in ("stem.conv", "stem.bn", "stage1.0.conv1", "stage1.1.conv2", "stage2.0.shortcut.0", "stage3.1.bn2",
                 "fc"):
        assert name in names
    assert names["stage3.0.conv1"].out_channels == 32
    assert names["fc"].in_features == 32


def test_residual_cnn_width_and_depth_change_size():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(ResidualCNN(width=8)) < count(ResidualCNN(width=16)) < count(ResidualCNN(width=16, depth=2))


def test_plain_cnn_and_mlp_names():
    assert {"block1.conv", "block2.bn", "block3.conv", "classifier"} <= dict(PlainCNN().named_modules()).keys()
    assert {"layers.fc1", "layers.fc2", "classifier"} <= dict(MLP().named_modules()).keys()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: ResidualCNN(width=0), "width"),
        (lambda: ResidualCNN(depth=0), "depth"),
        (lambda: PlainCNN(image_size=6), "image_size"),
        (lambda: MLP(hidden=(8, 0)), r"hidden\[1\]"),
    ],
)
def test_bad_sizes_are_named(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_models_are_deterministic_given_the_seed(tiny_input):
    torch.manual_seed(1)
    first = ResidualCNN(width=4)(tiny_input)
    torch.manual_seed(1)
    second = ResidualCNN(width=4)(tiny_input)
    torch.testing.assert_close(first, second)
