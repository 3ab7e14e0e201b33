"""The mirror's model repos: the real config files (rehearsal/hub_files/) with random weights at their shapes.

Each model is built from its repo's own config file with the libraries' initialisers skipped
(`helpers.tiny.shapes.no_init`) and filled by `helpers.tiny.shapes.random_init` (fast, scale-preserving), then saved
with the installed library's `save_pretrained` into a scratch folder, from which only the weight files are
copied: every config file in the mirror is the published one, not what today's library would write.
Weight dtypes follow the published files: fp32 weights plus `.fp16` variants for SD 1.5, fp16 for the
IP-Adapter file, fp32 elsewhere.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from helpers.tiny.shapes import no_init, random_init, random_ip_adapter_plus

from .hub_cache import RepoWriter
from .vocab import write_bert_vocab, write_clip_tokenizer_files

HUB_FILES = Path(__file__).parent / "hub_files"

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
IP_ADAPTER = "h94/IP-Adapter"
CLIP_L = "openai/clip-vit-large-patch14"
DINO = "facebook/dino-vits16"
BLIP = "Salesforce/blip-image-captioning-base"
CLIPSEG = "CIDAS/clipseg-rd64-refined"


def copy_hub_files(repo: RepoWriter) -> list[str]:
    """Copy the repo's published config files (rehearsal/hub_files/ORG--NAME/) into its snapshot."""
    src = HUB_FILES / repo.repo_id.replace("/", "--")
    rels = [p.relative_to(src).as_posix() for p in sorted(src.rglob("*")) if p.is_file()]
    for rel in rels:
        repo.copy(src / rel, rel)
    return rels


def _config(repo_id: str, rel: str) -> dict:
    return json.loads((HUB_FILES / repo_id.replace("/", "--") / rel).read_text())


def _save_weights(model, dest: Path, names: dict[str, str], **save_kwargs) -> None:
    """model.save_pretrained into a scratch folder; copy the files named in `names` (scratch name -> dest
    path). Raises if the library wrote shards or a different file name than expected."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
        for src, out in names.items():
            if not (Path(tmp) / src).is_file():
                raise RuntimeError(f"save_pretrained wrote {sorted(p.name for p in Path(tmp).iterdir())}, "
                                   f"not {src}")
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(Path(tmp) / src, out)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _random(build, seed: int):
    with no_init():
        model = build()
    random_init(model, seed)
    if hasattr(model, "tie_weights"):  # tied matrices hold one value, as in the published checkpoints
        model.tie_weights()
    return model.eval()


def build_sd15(repo: RepoWriter, vocab: dict[str, int], merges: list[str], ip_repo: RepoWriter) -> None:
    """stable-diffusion-v1-5: model_index, scheduler, unet, vae, text_encoder (+ .fp16 variants), tokenizer,
    feature_extractor, safety_checker config (no weights: the project passes safety_checker=None). The UNet
    is also what the random IP-Adapter Plus file is shaped for, so that file is written here too."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    copy_hub_files(repo)
    write_clip_tokenizer_files(repo.path("tokenizer"), vocab, merges, vocab_style="sd")

    unet = _random(lambda: UNet2DConditionModel.from_config(_config(SD15, "unet/config.json")), seed=1)
    _save_diffusers_with_fp16(unet, repo, "unet")
    ip_sd = random_ip_adapter_plus(unet, image_encoder_dim=1280, dim=768, seed=2)
    del unet
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in ip_sd.items()}, ip_repo.path("models/ip-adapter-plus_sd15.safetensors"),
              metadata={"format": "pt"})  # the published file holds fp16 tensors (98 MB)
    del ip_sd

    vae = _random(lambda: AutoencoderKL.from_config(_config(SD15, "vae/config.json")), seed=3)
    _save_diffusers_with_fp16(vae, repo, "vae")
    del vae

    te = _random(lambda: CLIPTextModel(CLIPTextConfig.from_dict(_config(SD15, "text_encoder/config.json"))), seed=4)
    _save_weights(te, repo.snapshot, {"model.safetensors": repo.path("text_encoder/model.safetensors")})
    te.half()
    _save_weights(te, repo.snapshot, {"model.safetensors": repo.path("text_encoder/model.fp16.safetensors")})
    del te


def _save_diffusers_with_fp16(model, repo: RepoWriter, sub: str) -> None:
    names = {"diffusion_pytorch_model.safetensors": repo.path(f"{sub}/diffusion_pytorch_model.safetensors")}
    _save_weights(model, repo.snapshot, names)
    model.half()
    names = {"diffusion_pytorch_model.fp16.safetensors": repo.path(f"{sub}/diffusion_pytorch_model.fp16.safetensors")}
    _save_weights(model, repo.snapshot, names, variant="fp16")


def build_ip_adapter_encoder(repo: RepoWriter) -> None:
    """h94/IP-Adapter models/image_encoder: OpenCLIP ViT-H/14 as CLIPVisionModelWithProjection (632M, fp32).
    (models/ip-adapter-plus_sd15.safetensors is written by build_sd15.)"""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    copy_hub_files(repo)
    cfg = CLIPVisionConfig.from_dict(_config(IP_ADAPTER, "models/image_encoder/config.json"))
    enc = _random(lambda: CLIPVisionModelWithProjection(cfg), seed=5)
    _save_weights(enc.float(), repo.snapshot, {"model.safetensors": repo.path("models/image_encoder/model.safetensors")})


def build_clip_l(repo: RepoWriter, vocab: dict[str, int], merges: list[str]) -> None:
    """openai/clip-vit-large-patch14: CLIPModel (428M), its tokenizer (vocab, merges, tokenizer.json) and
    image processor."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    copy_hub_files(repo)
    write_clip_tokenizer_files(repo.snapshot, vocab, merges, vocab_style="openai")
    with tempfile.TemporaryDirectory() as tmp:  # tokenizer.json as the tokenizers library writes it
        write_clip_tokenizer_files(Path(tmp), vocab, merges, vocab_style="openai")
        CLIPTokenizer.from_pretrained(tmp, model_max_length=77).save_pretrained(Path(tmp) / "out")
        shutil.copyfile(Path(tmp) / "out" / "tokenizer.json", repo.path("tokenizer.json"))
    model = _random(lambda: CLIPModel(CLIPConfig.from_dict(_config(CLIP_L, "config.json"))), seed=6)
    _save_weights(model, repo.snapshot, {"model.safetensors": repo.path("model.safetensors")})


def build_dino(repo: RepoWriter) -> None:
    """facebook/dino-vits16: ViTModel without pooler (22M), as the DINO conversion script saves it."""
    from transformers import ViTConfig, ViTModel

    copy_hub_files(repo)
    model = _random(lambda: ViTModel(ViTConfig.from_dict(_config(DINO, "config.json")), add_pooling_layer=False), seed=7)
    _save_weights(model, repo.snapshot, {"model.safetensors": repo.path("model.safetensors")})


def build_blip(repo: RepoWriter, bert_tokens: list[str]) -> None:
    """Salesforce/blip-image-captioning-base: BlipForConditionalGeneration (247M) and a BlipProcessor
    (384 px, CLIP mean/std; BERT tokenizer with [DEC] as bos and [ENC], on a stand-in vocabulary)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    copy_hub_files(repo)
    with tempfile.TemporaryDirectory() as tmp:
        tok = BertTokenizer(str(write_bert_vocab(Path(tmp), bert_tokens)), do_lower_case=True, model_max_length=512)
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        image = BlipImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
        out = Path(tmp) / "out"
        BlipProcessor(image_processor=image, tokenizer=tok).save_pretrained(out)
        # the published repo predates processor_config.json: write its file set (preprocessor_config.json,
        # tokenizer_config.json, special_tokens_map.json, vocab.txt, tokenizer.json) in the older format
        image_cfg = json.loads((out / "processor_config.json").read_text())["image_processor"]
        _write_json(repo.path("preprocessor_config.json"), {**image_cfg, "processor_class": "BlipProcessor"})
        _write_json(repo.path("special_tokens_map.json"), {
            "additional_special_tokens": ["[ENC]"], "bos_token": "[DEC]", "cls_token": "[CLS]", "mask_token": "[MASK]",
            "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"})
        _write_json(repo.path("tokenizer_config.json"), {
            "cls_token": "[CLS]", "do_basic_tokenize": True, "do_lower_case": True, "mask_token": "[MASK]",
            "model_max_length": 512, "name_or_path": "bert-base-uncased", "never_split": None, "pad_token": "[PAD]",
            "processor_class": "BlipProcessor", "sep_token": "[SEP]", "special_tokens_map_file": None,
            "strip_accents": None, "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer",
            "unk_token": "[UNK]"})
        repo.copy(Path(tmp) / "vocab.txt", "vocab.txt")
        repo.copy(out / "tokenizer.json", "tokenizer.json")
    model = _random(lambda: BlipForConditionalGeneration(BlipConfig.from_dict(_config(BLIP, "config.json"))), seed=8)
    _save_weights(model, repo.snapshot, {"model.safetensors": repo.path("model.safetensors")})


def build_clipseg(repo: RepoWriter, vocab: dict[str, int], merges: list[str]) -> None:
    """CIDAS/clipseg-rd64-refined: CLIPSegForImageSegmentation (150M: CLIP ViT-B/16 and its text tower, the
    refined decoder), CLIP's tokenizer files (vocab, merges, tokenizer.json) and the legacy image processor
    file (352 px, bilinear, ImageNet mean/std), all as transformers' CLIPSeg conversion script writes them."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPTokenizer

    copy_hub_files(repo)
    write_clip_tokenizer_files(repo.snapshot, vocab, merges, vocab_style="openai")
    with tempfile.TemporaryDirectory() as tmp:  # tokenizer.json as the tokenizers library writes it
        write_clip_tokenizer_files(Path(tmp), vocab, merges, vocab_style="openai")
        CLIPTokenizer.from_pretrained(tmp, model_max_length=77).save_pretrained(Path(tmp) / "out")
        shutil.copyfile(Path(tmp) / "out" / "tokenizer.json", repo.path("tokenizer.json"))
    config = CLIPSegConfig.from_dict(_config(CLIPSEG, "config.json"))
    model = _random(lambda: CLIPSegForImageSegmentation(config), seed=9)
    _save_weights(model, repo.snapshot, {"model.safetensors": repo.path("model.safetensors")})
