"""helpers.train.loss: the condition dropout keeps its rates, and the masked loss is its formula (the loss itself is
tested by training in test_loop.py)."""
import pytest
import torch
import torch.nn.functional as F

from helpers.train.loss import drop_masks, loss_weights, masked_mse


def test_dropout_rates_hold_over_many_draws():
    text, image = drop_masks(200_000, torch.Generator().manual_seed(0))
    rates = {"text only": (text & ~image).float().mean(), "image only": (image & ~text).float().mean(),
             "both": (text & image).float().mean(), "none": (~text & ~image).float().mean()}
    for case in ("text only", "image only", "both"):
        assert abs(rates[case] - 0.05) < 0.003, rates
    assert abs(rates["none"] - 0.85) < 0.004


def test_the_masked_loss_is_the_weighted_mean_computed_by_hand():
    """w = m + b (1 - m); per sample sum w (eps - eps_hat)^2 / sum w over channels and pixels; the batch mean.
    By hand: element by element in Python floats."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 3, generator=g), torch.randn(3, 4, 2, 3, generator=g)
    mask = torch.rand(3, 2, 3, generator=g)
    mask[0] = 0  # a sample with no character: all background
    mask[1, 0] = 1  # and one with whole pixels on it
    b = 0.1
    per_sample = []
    for i in range(3):
        num = den = 0.0
        for c in range(4):
            for y in range(2):
                for x in range(3):
                    w = float(mask[i, y, x]) + b * (1 - float(mask[i, y, x]))
                    num += w * (float(pred[i, c, y, x]) - float(target[i, c, y, x])) ** 2
                    den += w
        per_sample.append(num / den)
    by_hand = sum(per_sample) / 3
    assert masked_mse(pred, target, mask, b).item() == pytest.approx(by_hand, rel=1e-6)
    assert torch.equal(loss_weights(mask, b)[0], torch.full((2, 3), b))
    # the plain loss where every weight is equal: all on the character, or b = 1
    torch.testing.assert_close(masked_mse(pred, target, torch.ones(3, 2, 3), b), F.mse_loss(pred, target))
    torch.testing.assert_close(masked_mse(pred, target, mask, 1.0), F.mse_loss(pred, target))
    # the character counts more than the background: an error on it alone costs more than the same off it
    on, off = torch.zeros_like(pred), torch.zeros_like(pred)
    on[1, :, 0], off[1, :, 1] = 1.0, 1.0
    assert masked_mse(on, target * 0, mask, b) > masked_mse(off, target * 0, mask, b)


@pytest.mark.parametrize("b", [0, -0.1, 1.5, None])
def test_a_background_weight_outside_0_to_1_is_refused(b):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"background weight must lie in \(0, 1\]"):
        masked_mse(x, x, torch.zeros(1, 2, 2), b)
