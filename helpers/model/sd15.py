"""Stable Diffusion 1.5 + IP-Adapter Plus as numbers: the published configs' sizes, and the sampler the series uses.

Real sizes for tests, benchmarks and the notebooks' "SD 1.5:" columns, without a download
(docs/architecture.md, "Real shapes"): a UNet of 860M parameters with 16 cross-attention layers; the
OpenCLIP ViT-H/14 image encoder (hidden 1280, 32 layers; Plus reads its penultimate hidden states, 257 x 1280);
the Plus Resampler (dim 768, depth 4, dim_head 64, 12 heads, 16 queries); CLIP ViT-L/14's 77 text positions.
"""

# The sampler of every notebook: DDIM, as the seed project and the IP-Adapter paper sampled. A diffusers
# scheduler class, built from the base model's own scheduler config (helpers.model.pipeline.make_scheduler).
DEFAULT_SCHEDULER = "DDIMScheduler"

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)

VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
               image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")

RESAMPLER_DIM = 768  # Plus for SD 1.5: 12 heads of 64

TEXT_LEN = 77
