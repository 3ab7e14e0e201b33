"""helpers.model.diagram: the parameter counts reproduce the published ones, and the live counts add up."""
import pytest

from helpers.model.diagram import data_flow_diagram, parameter_counts, parameter_table, sd15_parameter_counts
from helpers.model.official_format import adapter_parameters


def test_sd15_counts_are_the_published_ones():
    sd15 = sd15_parameter_counts()  # built from the configs on the meta device: nothing allocated
    assert round(sd15["Resampler"] / 1e6, 1) == 29.9  # Ye et al. 2023 / the IP-Adapter code: the Plus Resampler
    assert round(sd15["to_k_ip + to_v_ip (16 layers)"] / 1e6, 2) == 19.17
    assert round(sd15["UNet without adapter"] / 1e6) == 860
    assert sd15["adapter, text-aware"] - sd15["adapter, vanilla"] == sd15["text-image block (new)"] == 4 * 768 * 768 + 768 + 4 * 768


def test_live_counts_cover_every_parameter(text_aware):
    unet = text_aware.unet
    counts = parameter_counts(unet)
    assert counts["adapter, text-aware"] == sum(p.numel() for p in adapter_parameters(unet).values())
    assert counts["adapter, text-aware"] + counts["UNet without adapter"] == sum(p.numel() for p in unet.parameters())
    table = parameter_table(counts, sd15_parameter_counts(), "tiny")
    assert list(table.index) == list(counts) and table.loc["UNet without adapter", "trains"] == "no (frozen)"


@pytest.mark.parametrize("random_weights", [False, True])
def test_the_diagram_labels_the_live_sizes_in_the_tiny_profile(text_aware, random_weights):
    fig = data_flow_diagram(text_aware, random_weights=random_weights)
    labels = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "257 × 1280" in labels and "16 × 768" in labels and ("(tiny:" in labels) == random_weights
