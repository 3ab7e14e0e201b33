"""helpers.data.captions: caption lengths counted in the base model's own tokens, against its 77 positions."""
from helpers.data.captions import token_counts


def test_token_counts_use_the_base_models_tokenizer(tiny_profile):
    long = "a cartoon drawing of " + "a green alien " * 30
    counts, limit = token_counts(["a cartoon drawing of a boy", long], tiny_profile.base_model)
    assert limit == 77
    assert counts[0] == 6 + 2  # the tiny vocabulary keeps words whole; plus start and end tokens
    assert counts[1] == 4 + 90 + 2 > limit  # nothing is cut: a caption over 77 tokens shows as one
