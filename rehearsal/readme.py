"""The README.md written at the top of a mirror: what is real, what is not, sizes and build times."""

from __future__ import annotations

import os
from pathlib import Path

from . import dataset, models
from .hub_cache import repo_folder_name

PROVENANCE = {
    models.SD15: "config files copied byte for byte from a git mirror of the published repo (model_index, scheduler, "
                 "unet, vae, text_encoder, tokenizer, feature_extractor, safety_checker)",
    models.IP_ADAPTER: "models/image_encoder/config.json copied from a public copy of the published file; the "
                       "IP-Adapter Plus file has the official keys (helpers.tiny.shapes.random_ip_adapter_plus), fp16 "
                       "as published",
    models.CLIP_L: "config.json, preprocessor_config.json, tokenizer_config.json, special_tokens_map.json copied "
                   "byte for byte from a git mirror of the published repo; tokenizer.json written by the "
                   "installed tokenizers library from the vocabulary",
    models.DINO: "config.json and preprocessor_config.json written from the DINO conversion script's values "
                 "(hidden 384, 12 layers, 6 heads, 1536, patch 16; legacy ViTFeatureExtractor file with "
                 "ImageNet mean/std): NOT checked against the published files",
    models.BLIP: "config.json from a public dump of the published config; processor files (preprocessor, "
                 "tokenizer) written by the installed transformers (384 px, CLIP mean/std, BERT tokenizer with "
                 "[DEC]/[ENC]) on a STAND-IN BERT vocabulary (the real ids of [PAD]/[UNK]/[CLS]/[SEP]/[MASK])",
    models.CLIPSEG: "config.json, preprocessor_config.json (legacy ViTFeatureExtractor file: 352 px, bilinear, "
                    "ImageNet mean/std) written from transformers' CLIPSeg conversion script's values (CLIP ViT-B/16, "
                    "reduce_dim 64, complex transposed convolution); tokenizer files as openai/clip-vit-base-patch32's, "
                    "which the script copies; weights as model.safetensors: NOT checked against the published files",
    dataset.REPO_ID: "README card and Parquet layout/columns as published; SYNTHETIC images",
}


def disk_size(folder: Path) -> int:
    """Bytes on disk under folder, not following symlinks."""
    return sum(p.lstat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def render(root: Path, files: dict[str, list[str]], revisions: dict[str, str], *, vocab_source: str, n_rows: int,
           times: dict[str, float]) -> str:
    lines = [
        "# Offline mirror of the `full` profile's Hub repos (for the rehearsal)",
        "",
        "Built by `python -m rehearsal.build_mirror`. Use it as a Hugging Face cache, offline:",
        "",
        "    HF_HOME=DIR HF_HUB_CACHE=DIR/hub HF_DATASETS_CACHE=DIR/datasets \\",
        "    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ...",
        "",
        "## What is real",
        "- repo ids, revisions (refs/main; where a public cache path shows the real one), subfolders and file names;",
        "- the hub cache layout (blobs/ content-addressed, snapshots/ symlinks) and the datasets cache an online",
        "  `load_dataset(id)` leaves (the Parquet builder's Arrow files, built through `load_dataset_builder`);",
        "- config files (per repo below) and every weight tensor's name, shape and dtype as the installed",
        "  libraries save them (SD 1.5's fp32 files and `.fp16` variants; the IP-Adapter file in fp16).",
        f"- CLIP's BPE vocabulary (SD 1.5 tokenizer and CLIP-L): {vocab_source}.",
        "",
        "## What is not",
        "- **every weight is random** (scale-preserving noise, helpers.tiny.shapes.random_init): pictures are noise,",
        "  scores meaningless, captions from BLIP gibberish;",
        f"- **the dataset is synthetic and small**: {n_rows} rows ({dataset.N_PAIRS} procedural drawings and their",
        f"  mirrors, {dataset.SIZE} x {dataset.SIZE} PNG) instead of 529 Rick and Morty frames. The real images' size",
        "  could not be checked offline; 512 px is the size the project trains at;",
        "- older weight-key spellings of the published files (e.g. the SD 1.5 VAE's legacy attention names,",
        "  which diffusers converts on load) are not reproduced: keys are today's;",
        "- safety_checker: config only, no weights. The project loads the pipeline with `safety_checker=None`,",
        "  and diffusers then never opens that folder (checked: the rehearsal passes without them). The real",
        "  repo's flax/onnx/.bin/.ckpt files and the non-EMA UNet are left out too: nothing loads them.",
        "",
        "## Repos",
        "",
        "| repo | revision | files | size | provenance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rid, rev in revisions.items():
        kind = "dataset" if rid == dataset.REPO_ID else "model"
        size = disk_size(root / "hub" / repo_folder_name(rid, kind))
        lines.append(f"| `{rid}` | `{rev[:12]}` | {len(files.get(rid, []))} | {size / 2**20:,.0f} MiB | {PROVENANCE[rid]} |")
    lines += ["", "Files:", ""]
    for rid, names in files.items():
        lines.append(f"- `{rid}`: " + ", ".join(f"`{n}`" for n in names))
    total = disk_size(root)
    lines += ["", f"## Build ({os.cpu_count()} CPU cores)", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += ["", f"Disk: {total / 2**30:.2f} GiB.", ""]
    return "\n".join(lines)
