"""helpers.share.card's "use it in your own script" text: one function for README, the card and notebook 04,
and the script it writes runs as written."""
from pathlib import Path

from helpers.share.card import README_ADAPTER, readme_snippet, use_snippet

ROOT = Path(__file__).parents[2]


def test_readme_shows_the_script_the_function_writes():
    readme = (ROOT / "README.md").read_text()
    assert "```python\n" + readme_snippet() + "```" in readme, (
        "README's 'Use a trained adapter in your own script' block is stale: paste "
        "helpers.share.card.readme_snippet() again")
    assert f'adapter="{README_ADAPTER}"' in readme_snippet()


def test_the_script_runs_as_written_and_draws_with_the_adapter(runs, tiny_profile, reference_image, tmp_path):
    adapter = runs[1]["finetuned-text-aware"]
    reference, out = tmp_path / "reference.png", tmp_path / "out.png"
    reference_image.save(reference)
    script = use_snippet("text_aware", str(adapter.parent), base_model=tiny_profile.base_model,
                         ip_adapter=tiny_profile.ip_adapter, device="cpu", dtype="float32", reference=str(reference),
                         steps=2, resolution=tiny_profile.resolution, scale=0.7, seed=3, out=str(out))
    scope = {}
    exec(script, scope)
    assert scope["pipe"].adapter_info["weights"] == str(adapter)  # the trained weights, not the pretrained ones
    assert scope["pipe"].unet.text_image_attn is not None
    assert out.is_file() and scope["image"].size == (tiny_profile.resolution,) * 2
    assert "set_ip_adapter_scale(0.7)" in script and "manual_seed(3)" in script
