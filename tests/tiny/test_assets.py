"""helpers.tiny: every tiny asset loads through the real loaders, offline, and has the real layout."""
import datasets
import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import ImageOps
from safetensors import safe_open
from transformers import (
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    ViTModel,
)

from helpers.model.official_format import ip_adapter_layer_keys
from helpers.tiny.assets import (
    IMAGE_ENCODER_DIM,
    IMAGE_ENCODER_SIZE,
    IP_ADAPTER_FILE,
    RESOLUTION,
    build_tiny_assets,
)


def test_unet_has_sd15_layout_and_16_cross_attention_layers(tiny_root):
    unet = UNet2DConditionModel.from_pretrained(tiny_root / "sd15", subfolder="unet", local_files_only=True)
    assert unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet.config.up_block_types == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert list(ip_adapter_layer_keys(unet)) == list(range(1, 32, 2))


def test_ip_adapter_file_is_official_format(tiny_root):
    path = tiny_root / "ip_adapter" / IP_ADAPTER_FILE
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        to_q = f.get_tensor("image_proj.layers.0.0.to_q.weight")
    assert {k.split(".")[0] for k in keys} == {"image_proj", "ip_adapter"}
    assert {f"ip_adapter.{k}.to_{kv}_ip.weight" for k in range(1, 32, 2) for kv in "kv"} <= keys
    assert {f"image_proj.layers.{i}.0.to_kv.weight" for i in range(4)} <= keys  # depth 4
    assert to_q.shape[0] % 64 == 0  # diffusers' converter assumes dim_head 64


def test_ip_adapter_loads_with_plain_diffusers_and_generates(tiny_root, reference_image):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_root / "sd15", local_files_only=True)
    pipe.load_ip_adapter(str(tiny_root / "ip_adapter"), subfolder="", weight_name=IP_ADAPTER_FILE,
                         image_encoder_folder="image_encoder", local_files_only=True)
    assert type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterPlusImageProjection"
    out = pipe("a cartoon drawing of a boy", ip_adapter_image=reference_image, num_inference_steps=2,
               height=RESOLUTION, width=RESOLUTION, output_type="np").images
    assert out.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(out).all()


def test_encoders_and_metric_models_load_offline(tiny_root):
    enc = CLIPVisionModelWithProjection.from_pretrained(tiny_root / "ip_adapter" / "image_encoder", local_files_only=True)
    hidden = enc(torch.zeros(1, 3, IMAGE_ENCODER_SIZE, IMAGE_ENCODER_SIZE), output_hidden_states=True).hidden_states
    assert hidden[-2].shape == (1, (IMAGE_ENCODER_SIZE // 8) ** 2 + 1, IMAGE_ENCODER_DIM)  # 257 x 1280 at real size
    assert CLIPModel.from_pretrained(tiny_root / "clip", local_files_only=True).config.projection_dim == 16
    assert ViTModel.from_pretrained(tiny_root / "dino", local_files_only=True).config.hidden_size == 32


def test_tokenizer_keeps_caption_words_whole(tiny_root):
    tok = CLIPTokenizer.from_pretrained(tiny_root / "sd15" / "tokenizer", local_files_only=True)
    assert tok.tokenize("a cartoon drawing of a scientist") == ["a</w>", "cartoon</w>", "drawing</w>", "of</w>", "a</w>", "scientist</w>"]
    assert len(tok("a cartoon").input_ids) == 4 and tok.model_max_length == 77  # <bos> a cartoon <eos>


def test_dataset_has_columns_and_mirrored_pairs(tiny_root):
    ds = datasets.load_dataset(str(tiny_root / "dataset"), split="train")
    assert ds.column_names == ["image", "text"] and len(ds) >= 48
    arrays = [np.asarray(im) for im in ds["image"]]
    for i, a in enumerate(arrays):
        mirror = np.asarray(ImageOps.mirror(ds[i]["image"]))
        twins = [j for j, b in enumerate(arrays) if j != i and np.array_equal(b, mirror)]
        assert len(twins) == 1, f"row {i} should have exactly one mirrored copy"
        assert not np.array_equal(a, mirror), "drawings must be asymmetric so that mirrors differ"
        assert ds[twins[0]]["text"] == ds[i]["text"]


def test_build_is_deterministic_and_reused(tmp_path, tiny_root):
    other = build_tiny_assets(tmp_path / "again")
    for rel in ["sd15/unet/diffusion_pytorch_model.safetensors", f"ip_adapter/{IP_ADAPTER_FILE}"]:
        with safe_open(str(tiny_root / rel), "pt") as a, safe_open(str(other / rel), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    stamp = (other / "COMPLETE").stat().st_mtime_ns
    assert build_tiny_assets(tmp_path / "again") == other and (other / "COMPLETE").stat().st_mtime_ns == stamp


def test_the_tiny_segmenter_is_a_clipseg_laid_out_as_the_full_profiles(tiny_root, reference_image):
    """CLIPSeg's classes and processor load it offline; like CIDAS/clipseg-rd64-refined it has the refined decoder,
    patch 16 and a processor size other than its vision config's (positions interpolated), and it gives logits at
    the processor's size."""
    from helpers.data.masks import load_segmenter
    from helpers.tiny.assets import SEGMENTER_SIZE

    seg = load_segmenter(str(tiny_root / "clipseg"), device="cpu")
    config = seg.model.config
    assert type(seg.model).__name__ == "CLIPSegForImageSegmentation" and type(seg.processor).__name__ == "CLIPSegProcessor"
    assert config.use_complex_transposed_convolution and config.vision_config.patch_size == 16
    assert config.vision_config.image_size != SEGMENTER_SIZE
    assert seg.logits([reference_image] * 2, ["boy", "a cartoon character"]).shape == (2, SEGMENTER_SIZE, SEGMENTER_SIZE)
