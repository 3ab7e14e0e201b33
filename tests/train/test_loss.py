"""helpers.train.loss: the condition dropout keeps its rates (the loss itself is tested by training in test_train.py)."""
import torch

from helpers.train.loss import drop_masks


def test_dropout_rates_hold_over_many_draws():
    text, image = drop_masks(200_000, torch.Generator().manual_seed(0))
    rates = {"text only": (text & ~image).float().mean(), "image only": (image & ~text).float().mean(),
             "both": (text & image).float().mean(), "none": (~text & ~image).float().mean()}
    for case in ("text only", "image only", "both"):
        assert abs(rates[case] - 0.05) < 0.003, rates
    assert abs(rates["none"] - 0.85) < 0.004
