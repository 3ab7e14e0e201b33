"""Tiny, random-weight stand-ins for every model and dataset of the `full` profile, built offline.

The `tiny` profile runs the same code paths as `full` (Stable Diffusion 1.5 + IP-Adapter Plus) with
small random models, so the notebooks and tests run on a CPU without the Hugging Face Hub. Nothing
here is trained: every picture and score that comes out of these models is noise with the right shape.

What `build_tiny_assets()` writes, once, into a cache folder (atomically; a finished folder is reused):

    sd15/                      StableDiffusionPipeline.save_pretrained(): a UNet with SD 1.5's block layout
                               (3 x CrossAttnDownBlock2D + DownBlock2D, layers_per_block=2, so 16 cross-
                               attention layers and official IP-Adapter keys 1, 3, ..., 31), VAE, CLIP text
                               encoder and tokenizer, CLIPImageProcessor, and SD 1.5's own scheduler config
                               (PNDM, steps_offset 1, skip_prk_steps: the sampler is the profile's choice)
    ip_adapter/ip-adapter-plus_tiny.safetensors
                               an IP-Adapter Plus checkpoint in the official file format
                               (image_proj.* Resampler with dim_head 64 and depth 4, ip_adapter.{k}.to_{k,v}_ip)
    ip_adapter/image_encoder/  CLIPVisionModelWithProjection (Plus reads its penultimate hidden states)
    clip/                      CLIPModel + tokenizer + processor, for CLIP-T / CLIP-I
    dino/                      ViTModel + image processor, for DINO similarity
    dataset/                   synthetic "cartoon characters" with captions and mirrored copies, stored as
                               the Hub dataset is (parquet under data/, columns image and text)

Every model loads through the real loaders (`from_pretrained(..., local_files_only=True)`,
`load_ip_adapter`, `datasets.load_dataset`), exactly as the Hub models do in the `full` profile.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from .shapes import random_ip_adapter_plus

TINY_VERSION = "v2"  # bump when anything below changes, so caches are rebuilt

# Sizes, chosen to keep the layout of the real models while staying fast on a CPU.
TEXT_DIM = 32  # text encoder width = UNet cross_attention_dim (768 in SD 1.5)
IMAGE_ENCODER_DIM = 32  # CLIP vision width (1280 in ViT-H/14)
IMAGE_ENCODER_SIZE = 32  # CLIP vision input size (224)
RESAMPLER_DIM = 128  # Resampler width; diffusers' converter needs heads = dim / 64 (768 -> 12 heads)
RESAMPLER_QUERIES = 16  # image tokens per reference, as in IP-Adapter Plus
RESOLUTION = 64  # pixels (512 in the full profile); latents are RESOLUTION / 8
IP_ADAPTER_FILE = "ip-adapter-plus_tiny.safetensors"


def default_cache_dir() -> Path:
    """Where tiny assets live: $IPA_TINY_CACHE, else ~/.cache/ipa-text-aware."""
    root = os.environ.get("IPA_TINY_CACHE") or Path.home() / ".cache" / "ipa-text-aware"
    return Path(root) / f"tiny-{TINY_VERSION}"


def build_tiny_assets(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build every tiny asset once (deterministic, no network) and return the folder that holds them.

    A complete folder is reused as is. The folder is built under a temporary name and renamed when
    complete, so an interrupted build never leaves a half-written cache behind.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / "COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        _build_sd15(tmp / "sd15")
        _build_ip_adapter(tmp / "ip_adapter")
        _build_clip(tmp / "clip")
        _build_dino(tmp / "dino")
        build_cartoon_dataset(tmp / "dataset")
        (tmp / "COMPLETE").write_text(f"tiny assets {TINY_VERSION}: random weights, for tests only\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level BPE with a small vocabulary in which the words of our captions are single
# tokens (attention maps then read word by word).
# --------------------------------------------------------------------------------------------------

WORDS = (
    "a an the of in on with and at is cartoon drawing character style picture photo "
    "rick morty green blue red yellow orange purple pink white black brown grey hair haired "
    "shirt coat dress standing waving jumping sitting running smiling sad happy angry face "
    "background sky grass space ship city beach forest desert night day sun moon snow rain "
    "man woman boy girl alien robot dog cat scientist lab portal gun hat glasses "
    "wearing holding eating dancing flying painting watercolor pixel sketch anime oil "
    "by tall short round big small old young two one front ears"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of GPT-2 / CLIP BPE (the BPE's 256 base symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """Byte-level vocabulary + BPE merges learned on WORDS (plain BPE training: merge the most frequent
    pair until every word is one token), so that encoding reproduces whole words."""
    from collections import Counter

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(WORDS)]
    merges: list[str] = []
    while any(len(w) > 1 for w in words):
        counts = Counter(pair for w in words for pair in zip(w, w[1:]))
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))  # ties broken deterministically
        merges.append(f"{a} {b}")
        vocab_list.append(a + b)
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(a + b)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}, merges


def _save_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tok.save_pretrained(folder)
    return tok


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def tiny_unet_config() -> dict:
    """SD 1.5's UNet layout with tiny widths (real: 320/640/1280/1280, cross_attention_dim 768)."""
    return dict(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def _build_sd15(folder: Path):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        scaling_factor=0.18215,
    )
    tok = _save_tokenizer(folder / "tokenizer")
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k not in ("_class_name", "clip_sample")})
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_ENCODER_SIZE}, crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE}
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=feature_extractor, image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))


# stable-diffusion-v1-5/stable-diffusion-v1-5's scheduler/scheduler_config.json (less its _diffusers_version):
# PNDM, which the pipeline uses unless told otherwise; clip_sample is there for other schedulers built from it
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


def _tiny_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=IMAGE_ENCODER_DIM, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_ENCODER_SIZE, patch_size=8, projection_dim=16,
    )


def _build_ip_adapter(folder: Path):
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(4)
    CLIPVisionModelWithProjection(_tiny_vision_config()).save_pretrained(folder / "image_encoder")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder.parent / "sd15", subfolder="unet", local_files_only=True)
    sd = random_ip_adapter_plus(unet, image_encoder_dim=IMAGE_ENCODER_DIM, dim=RESAMPLER_DIM,
                                queries=RESAMPLER_QUERIES, seed=3)
    save_file(sd, folder / IP_ADAPTER_FILE)


def _build_clip(folder: Path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig

    tok = _save_tokenizer(folder)
    torch.manual_seed(5)
    text = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=_tiny_vision_config().to_dict(), projection_dim=16))
    model.save_pretrained(folder)
    proc = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_ENCODER_SIZE}, crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE}
    )
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)


def _build_dino(folder: Path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(6)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


# --------------------------------------------------------------------------------------------------
# Synthetic dataset: procedurally drawn cartoon characters in poses and scenes, with captions, and a
# horizontally mirrored copy of every drawing (as in Norod78/RickAndMorty-HorizontalMirror-blip-captions).
# --------------------------------------------------------------------------------------------------

CHARACTERS = [  # (description, skin, hair colour name, hair rgb, shirt colour name, shirt rgb, hair style)
    ("a scientist", (236, 214, 190), "blue", (120, 170, 230), "white", (245, 245, 245), "spiky"),
    ("a boy", (245, 205, 170), "brown", (120, 80, 40), "yellow", (245, 220, 60), "flat"),
    ("a girl", (240, 200, 165), "orange", (235, 120, 40), "pink", (240, 130, 180), "long"),
    ("an alien", (140, 210, 120), "purple", (140, 70, 180), "grey", (150, 150, 150), "antenna"),
    ("a robot", (180, 190, 200), "black", (40, 40, 40), "red", (210, 50, 50), "flat"),
    ("a woman", (220, 180, 150), "red", (190, 40, 40), "green", (60, 160, 80), "long"),
    ("an old man", (230, 200, 180), "white", (235, 235, 235), "brown", (140, 100, 60), "spiky"),
    ("a cat", (250, 170, 80), "black", (30, 30, 30), "blue", (60, 90, 200), "ears"),
]
POSES = ["standing", "waving", "jumping"]
SCENES = [("sky", (150, 200, 245), "in front of a blue sky"), ("grass", (120, 190, 100), "on green grass"),
          ("space", (20, 20, 50), "in space at night")]


def draw_character(index: int, pose: str, scene: int, size: int = 128):
    """Draw one asymmetric cartoon character (PIL RGB image). Asymmetry makes mirrors differ."""
    from PIL import Image, ImageDraw

    desc, skin, _, hair, _, shirt, style = CHARACTERS[index]
    _, bg, _ = SCENES[scene]
    s = size / 128
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    S = lambda *xy: [v * s for v in xy]  # noqa: E731  (scale 128-px coordinates)
    d.ellipse(S(96, 8, 120, 32), fill=(250, 230, 90) if scene != 2 else (230, 230, 230))  # sun / moon, top right
    dy = -14 if pose == "jumping" else 0
    d.rectangle(S(48, 66 + dy, 80, 104 + dy), fill=shirt, outline=(0, 0, 0), width=max(1, int(2 * s)))  # body
    d.line(S(56, 104 + dy, 52, 122 + dy), fill=(0, 0, 0), width=max(1, int(4 * s)))  # legs
    d.line(S(72, 104 + dy, 76, 122 + dy), fill=(0, 0, 0), width=max(1, int(4 * s)))
    d.line(S(48, 72 + dy, 34, 96 + dy), fill=skin, width=max(1, int(5 * s)))  # left arm down
    if pose == "waving":
        d.line(S(80, 72 + dy, 100, 48 + dy), fill=skin, width=max(1, int(5 * s)))  # right arm up
    else:
        d.line(S(80, 72 + dy, 94, 96 + dy), fill=skin, width=max(1, int(5 * s)))
    d.ellipse(S(40, 22 + dy, 88, 70 + dy), fill=skin, outline=(0, 0, 0), width=max(1, int(2 * s)))  # head
    d.ellipse(S(50, 38 + dy, 60, 48 + dy), fill=(255, 255, 255), outline=(0, 0, 0))  # eyes, looking right
    d.ellipse(S(66, 38 + dy, 76, 48 + dy), fill=(255, 255, 255), outline=(0, 0, 0))
    d.ellipse(S(55, 41 + dy, 59, 45 + dy), fill=(0, 0, 0))
    d.ellipse(S(71, 41 + dy, 75, 45 + dy), fill=(0, 0, 0))
    d.arc(S(54, 50 + dy, 76, 62 + dy), 20, 160, fill=(0, 0, 0), width=max(1, int(2 * s)))  # smile
    if style == "spiky":
        for x in range(40, 88, 8):
            d.polygon(S(x, 30 + dy, x + 8, 30 + dy, x + 10, 12 + dy), fill=hair)
    elif style == "flat":
        d.chord(S(40, 20 + dy, 88, 50 + dy), 180, 360, fill=hair)
    elif style == "long":
        d.chord(S(38, 18 + dy, 90, 50 + dy), 180, 360, fill=hair)
        d.rectangle(S(36, 34 + dy, 44, 80 + dy), fill=hair)
    elif style == "antenna":
        d.line(S(70, 24 + dy, 82, 6 + dy), fill=hair, width=max(1, int(3 * s)))
        d.ellipse(S(78, 2 + dy, 86, 10 + dy), fill=hair)
    elif style == "ears":
        d.polygon(S(42, 34 + dy, 48, 12 + dy, 58, 26 + dy), fill=hair)
        d.polygon(S(70, 26 + dy, 80, 12 + dy, 86, 34 + dy), fill=hair)
    return im


def cartoon_caption(index: int, pose: str, scene: int) -> str:
    desc, _, hair_name, _, shirt_name, _, style = CHARACTERS[index]
    hair = "ears" if style == "ears" else "hair"
    return f"a cartoon drawing of {desc} with {hair_name} {hair} and a {shirt_name} shirt {pose} {SCENES[scene][2]}"


def build_cartoon_dataset(folder: str | os.PathLike, size: int = 128) -> Path:
    """Write the synthetic dataset (48 rows: 24 drawings + their mirrors) as the Hub stores datasets.

    Layout: folder/data/train-00000-of-00001.parquet with columns `image` (datasets.Image) and `text`,
    loadable with `datasets.load_dataset(str(folder), split="train")`.
    """
    import datasets
    from PIL import ImageOps

    folder = Path(folder)
    rng = random.Random(0)
    rows = []
    for c in range(len(CHARACTERS)):
        for p, pose in enumerate(POSES):
            scene = (c + p) % len(SCENES)
            im, text = draw_character(c, pose, scene, size), cartoon_caption(c, pose, scene)
            rows += [(im, text), (ImageOps.mirror(im), text)]
    rng.shuffle(rows)
    ds = datasets.Dataset.from_dict({"image": [r[0] for r in rows], "text": [r[1] for r in rows]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "README.md").write_text(
        "# Synthetic cartoon characters (tiny profile)\n\nProcedurally drawn by helpers.tiny: "
        f"{len(CHARACTERS)} characters x {len(POSES)} poses, each with a horizontally mirrored copy "
        f"({len(rows)} rows). Columns: image, text. For tests only.\n"
    )
    return folder


if __name__ == "__main__":  # python -m helpers.tiny [folder]
    import sys

    print(build_tiny_assets(sys.argv[1] if len(sys.argv) > 1 else None))
