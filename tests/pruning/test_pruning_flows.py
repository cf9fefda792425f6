"""The helpers of the three flows: re-initialisation and rewinding of a pruned architecture."""

import torch

from lightning_compress.demo import PlainCNN
from lightning_compress.pruning import compact
from lightning_compress.pruning.flows import reinitialize, rewind


def _prune_filters(model, rows=(0, 2, 5)):
    with torch.no_grad():
        model.block2.conv.weight[list(rows)] = 0
    return model


def test_reinitialize_keeps_the_architecture_and_draws_new_weights():
    model = compact(_prune_filters(PlainCNN(width=4)).eval(), torch.randn(4, 1, 8, 8))
    fresh = reinitialize(model, seed=0)
    assert fresh.block2.conv.weight.shape == model.block2.conv.weight.shape == (5, 4, 3, 3)
    assert not torch.equal(fresh.block2.conv.weight, model.block2.conv.weight)
    assert torch.equal(fresh.block2.bn.running_mean, torch.zeros(5))
    torch.testing.assert_close(reinitialize(model, seed=0).block3.conv.weight, fresh.block3.conv.weight)


def test_rewind_puts_early_weights_on_the_kept_channels():
    torch.manual_seed(0)
    early = PlainCNN(width=4)
    early_state = {k: v.clone() for k, v in early.state_dict().items()}
    trained = PlainCNN(width=4)  # other weights: "later in training"
    pruned = _prune_filters(trained).eval()
    example = torch.randn(4, 1, 8, 8)
    rewound = rewind(pruned, early_state, example)
    kept = [1, 3, 4, 6, 7]
    assert rewound.block2.conv.weight.shape[0] == 5
    torch.testing.assert_close(rewound.block2.conv.weight, early_state["block2.conv.weight"][kept])
    torch.testing.assert_close(rewound.block3.conv.weight, early_state["block3.conv.weight"][:, kept])
    torch.testing.assert_close(rewound.block1.conv.weight, early_state["block1.conv.weight"])
