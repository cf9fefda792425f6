import pytest
from torch import nn

from lightning_compress.demo import ResidualCNN
from lightning_compress.graph.layers import select_layers


def test_default_selects_convs_and_linears_in_order():
    selected = select_layers(ResidualCNN(width=4))
    assert next(iter(selected)) == "stem.conv" and list(selected)[-1] == "fc"
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in selected.values())


def test_exact_names_regexes_types_and_excludes():
    model = ResidualCNN(width=4)
    assert list(select_layers(model, "stem.conv")) == ["stem.conv"]
    assert list(select_layers(model, r"stage2\..*conv\d")) == ["stage2.0.conv1", "stage2.0.conv2"]
    assert list(select_layers(model, types=["Linear"])) == ["fc"]
    assert "fc" not in select_layers(model, exclude=["fc", r".*shortcut.*"])
    assert list(select_layers(model, r"stem\..*", types=["BatchNorm2d"])) == ["stem.bn"]


def test_a_pattern_matching_nothing_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"'stage9\.conv'.*available: \['stem.conv'"):
        select_layers(ResidualCNN(width=4), ["stem.conv", "stage9.conv"])


def test_pattern_of_the_wrong_type_matches_nothing():
    with pytest.raises(ValueError, match=r"'stem\.bn' matches no layer of type"):
        select_layers(ResidualCNN(width=4), "stem.bn")


def test_unknown_type_and_invalid_regex_are_named():
    with pytest.raises(ValueError, match="'Conv7d'"):
        select_layers(ResidualCNN(width=4), types=["Conv7d"])
    with pytest.raises(ValueError, match=r"'stage\['"):
        select_layers(ResidualCNN(width=4), "stage[")


def test_conv1d_models_are_supported():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    assert list(select_layers(model, types=["Conv1d"])) == ["0"]
