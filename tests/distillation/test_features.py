"""FeatureTaps (hooks by qualified name) and the layer-pair shape check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.demo import ResidualCNN
from lightning_compress.distillation.taps import (
    FeatureTaps,
    LayerPair,
    check_layer_names,
    check_layer_pairs,
    eval_mode,
    inspect_layer_pairs,
)


def _hook_count(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_taps_capture_named_outputs_in_order(tiny_input: torch.Tensor) -> None:
    model = ResidualCNN(width=4)
    taps = FeatureTaps(model, ["stage2", "stem", "stage1.0.conv1"])
    model(tiny_input)
    shapes = [tuple(f.shape) for f in taps.features()]
    assert shapes == [(4, 8, 4, 4), (4, 4, 8, 8), (4, 4, 8, 8)]
    assert taps["stage2"].grad_fn is not None  # captured in the graph for feature losses
    taps.remove()


def test_taps_clear_overwrite_and_remove(tiny_input: torch.Tensor) -> None:
    model = ResidualCNN(width=4)
    with FeatureTaps(model, ["stage1"]) as taps:
        assert _hook_count(model) == 1
        model(tiny_input)
        first = taps["stage1"]
        model(tiny_input[:2])
        assert taps["stage1"].shape[0] == 2 and taps["stage1"] is not first
        taps.clear()
        with pytest.raises(KeyError, match="no captured output"):
            taps["stage1"]
    assert _hook_count(model) == 0 and not taps.active and not taps.outputs
    taps.remove()  # idempotent
    model(tiny_input)
    assert not taps.outputs


def test_taps_under_no_grad_carry_no_graph(tiny_input: torch.Tensor) -> None:
    model = ResidualCNN(width=4)
    with FeatureTaps(model, ["stage3"]) as taps, torch.no_grad():
        model(tiny_input)
        assert taps["stage3"].grad_fn is None and not taps["stage3"].requires_grad


def test_unknown_layer_is_named_with_available_names() -> None:
    model = ResidualCNN(width=4)
    with pytest.raises(ValueError, match=r"Unknown model layer 'stage9' in ResidualCNN; available: \['stem', "):
        FeatureTaps(model, ["stage1", "stage9"])
    assert _hook_count(model) == 0  # nothing registered on failure
    with pytest.raises(ValueError, match="Unknown teacher layer 'fc1'"):
        check_layer_names(model, ["fc1"], "teacher")


def test_tuple_outputs_keep_the_first_element() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x + 1, x - 1

    model = nn.Sequential()
    model.add_module("pair", Pair())
    with FeatureTaps(model, ["pair"]) as taps:
        model(torch.zeros(1))
        torch.testing.assert_close(taps["pair"], torch.ones(1))


def test_layer_pair_verdicts() -> None:
    assert LayerPair("a", "b", (2, 4, 8, 8), (2, 4, 8, 8)).verdict == "same"
    assert LayerPair("a", "b", (2, 4, 8, 8), (2, 8, 8, 8)).verdict == "channels"
    assert LayerPair("a", "b", (2, 4, 8, 8), (2, 4, 4, 4)).verdict == "spatial"
    assert LayerPair("a", "b", (2, 4, 8, 8), (2, 8, 4, 4)).verdict == "channels+spatial"
    assert LayerPair("a", "b", (2, 4, 8, 8), (2, 8)).verdict == "rank"
    assert LayerPair("a", "b", (2, 4), (3, 4)).verdict == "batch"


def test_inspect_pairs_on_reference_models_restores_modes_and_stats(tiny_input: torch.Tensor) -> None:
    student, teacher = ResidualCNN(width=4), ResidualCNN(width=8)
    teacher.stage1.eval()  # a mixed mode must come back as it was
    running_mean = student.stem.bn.running_mean.clone()
    pairs = inspect_layer_pairs(student, teacher, ["stage1", "stage1", "fc"], ["stage1", "stage2", "stage3"],
                                tiny_input)
    assert [p.verdict for p in pairs] == ["channels", "channels+spatial", "rank"]
    assert pairs[1].student_shape == (4, 4, 8, 8) and pairs[1].teacher_shape == (4, 16, 4, 4)
    assert student.training and teacher.training and not teacher.stage1.training
    torch.testing.assert_close(student.stem.bn.running_mean, running_mean)
    assert _hook_count(student) == _hook_count(teacher) == 0
    check_layer_pairs(pairs[:2])
    with pytest.raises(ValueError, match=r"student 'fc' \(4, 10\) vs teacher 'stage3' \(4, 32, 2, 2\): rank"):
        check_layer_pairs(pairs)
    with pytest.raises(ValueError, match=r"cannot be matched for FSP.*channels"):
        check_layer_pairs(pairs, allowed=("same", "spatial"), purpose="FSP")


def test_inspect_pairs_rejects_unequal_lists(tiny_input: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"pair up one to one, got 2 and 1"):
        inspect_layer_pairs(ResidualCNN(width=4), ResidualCNN(width=4), ["stem", "fc"], ["stem"], tiny_input)


def test_eval_mode_restores_on_error() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model[0].training
        raise RuntimeError
    assert model[0].training
