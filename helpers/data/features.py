"""The feature cache: every training image and caption encoded once, so training never runs the VAE or the
encoders.

    path = cache_features(prep.train, out_dir, base_model=..., ip_adapter=..., resolution=512)
    tensors, meta = load_feature_cache(path)
    prep, path = prepare_for_training(profile, data_dir)    # notebook 01's data as it is + its cache
    mirror = cache_mirror_features(prep.train, path, ...)   # features of the flipped images (mirror pairing)
    path = cache_image_variant(prep.train, path, "masked", transform, ...)  # other pictures' (helpers.train.masking)

Tensors (rows in the split's order; sizes for SD 1.5 + ViT-H/14 at 512 px; see encode_batch, null_features):
    latent_mean, latent_std (N, 4, 64, 64); image_embeds (N, 257, 1280); text_embeds (N, 77, 768);
    null_image_embeds (1, 257, 1280); null_text_embeds (1, 77, 768)
A cache carries a fingerprint of its data and models (`feature_fingerprint`, from helpers.data.fingerprints'
stamps): an unchanged one is reused, a stale one rebuilt.

Faults: a cache is rebuilt under the data folder's lock (helpers.support.lock; a second writer stops with
FolderInUse, while reading an up-to-date cache needs no lock), written beside the old one and renamed over it
(helpers.support.atomic), so a full disk (DiskFull naming the file, checked after the first batch and at the
write) or an interrupt keeps the old file. Out of GPU memory raises FeatureCacheError naming the batch size
to lower (profile.feature_batch_size): each row is encoded on its own, so any batch size gives the same cache
(up to fp16 rounding) and the batch size may change between runs.

Several processes (torchrun, accelerate launch; helpers.support.ranks): prepare_for_training and cache_features
are called by every process. The main process prepares the data first; then the cache's jobs (the batches one
process encodes, and the null features) are dealt out, each process writes its own jobs to shares beside the
cache, and the main process merges them into the one cache file (atomic, as above): the same tensors as one
process makes. A launch killed part way leaves its shares; the next build, with any number of processes,
uses them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..model.pipeline import load_pipeline
from ..support import ranks
from ..support.atomic import replacing
from ..support.disk import check_space
from ..support.lock import FolderLock
from .fingerprints import holds, model_stamp, split_fingerprint
from .images import center_square
from .prepare import use_prepared
from .prepared_folder import PreparedData

CACHE_VERSION = "1"  # bump when a cache would come out different, so old ones are rebuilt
TRAIN_FEATURES = "train_features.safetensors"


class FeatureCacheError(RuntimeError):
    """The feature cache could not be built (out of GPU memory); the message says which setting to change."""


def feature_fingerprint(split, *, base_model, ip_adapter, image_encoder=None, resolution: int) -> dict[str, str]:
    """The metadata a cache built now would carry; its "fingerprint" decides reuse."""
    parts = {
        "format": "ipa-feature-cache", "version": CACHE_VERSION, "resolution": str(resolution),
        "data": split_fingerprint(split), "rows": str(len(split)),
        "base_model": str(base_model), "base_model_stamp": model_stamp(base_model),
        "ip_adapter": str(ip_adapter), "ip_adapter_stamp": model_stamp(ip_adapter),
        "image_encoder": str(image_encoder), "image_encoder_stamp": model_stamp(image_encoder),
    }
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


def encode_text(pipe, texts: Sequence[str]) -> torch.Tensor:
    """(B, 77, C) text encoder hidden states, as StableDiffusionPipeline.encode_prompt computes them
    (padding to max_length, truncation, attention mask only if the encoder's config asks for one)."""
    tok = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    device = pipe.text_encoder.device
    mask = tok.attention_mask.to(device) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else None
    return pipe.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]


def encode_batch(pipe, images: Sequence[Image.Image], texts: Sequence[str], resolution: int) -> dict[str, torch.Tensor]:
    """Features of one batch, in the pipeline's dtype, on its device.

    latent_mean, latent_std  (B, 4, r/8, r/8)  VAE posterior of the image scaled to [-1, 1], UNscaled
                                               (training: (mean + std * eps) * vae.config.scaling_factor)
    image_embeds             (B, 257, 1280)    image encoder hidden_states[-2] of the feature_extractor's
                                               pixels, as pipe.encode_image(..., output_hidden_states=True)
    text_embeds              (B, 77, 768)      text_encoder(input_ids)[0], as pipe.encode_prompt
    (sizes for SD 1.5 + ViT-H/14; the tiny models are narrower)
    """
    images = [center_square(im.convert("RGB"), resolution) for im in images]
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(images, height=resolution, width=resolution)
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return {"latent_mean": dist.mean, "latent_std": dist.std, "image_embeds": encode_images(pipe, images),
            "text_embeds": encode_text(pipe, texts)}


def encode_images(pipe, images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 257, 1280) image encoder hidden_states[-2] of the feature_extractor's pixels of RGB images, as
    pipe.encode_image(..., output_hidden_states=True) computes them (IP-Adapter Plus's input)."""
    enc = pipe.image_encoder
    dtype = next(enc.parameters()).dtype
    clip_pixels = pipe.feature_extractor(list(images), return_tensors="pt").pixel_values.to(enc.device, dtype)
    return enc(clip_pixels, output_hidden_states=True).hidden_states[-2]


def null_features(pipe) -> dict[str, torch.Tensor]:
    """The dropped conditions: null_image_embeds (1, 257, 1280), features of a zero pixel tensor shaped like
    the feature_extractor's output (diffusers' unconditional image branch for Plus: torch.zeros_like of the
    pixel values), and null_text_embeds (1, 77, 768), the empty prompt."""
    enc = pipe.image_encoder
    pixels = pipe.feature_extractor(Image.new("RGB", (64, 64)), return_tensors="pt").pixel_values  # (1, 3, 224, 224)
    zeros = torch.zeros_like(pixels).to(enc.device, next(enc.parameters()).dtype)
    return {"null_image_embeds": enc(zeros, output_hidden_states=True).hidden_states[-2],
            "null_text_embeds": encode_text(pipe, [""])}


def cache_features(split, out_dir, *, base_model, ip_adapter, image_encoder=None, resolution: int,
                   batch_size: int = 16, device=None, filename: str = "features.safetensors",
                   progress: bool = True) -> Path:
    """Encode every row of `split` once and write out_dir/filename (one .safetensors, fp16, atomic).

    Tensors (rows in the split's order; sizes for SD 1.5 + ViT-H/14 at 512 px):
        latent_mean, latent_std (N, 4, r/8, r/8); image_embeds (N, 257, 1280); text_embeds (N, 77, 768);
        null_image_embeds (1, 257, 1280); null_text_embeds (1, 77, 768)   (see encode_batch, null_features)
    Metadata (strings): fingerprint and its parts (data, models, resolution, version), ids (JSON list),
    scaling_factor. An existing file with the same fingerprint is reused without loading any model or taking
    any lock; a different one is rebuilt holding out_dir's lock (FolderInUse when another writer has it).
    Models come from helpers.model.pipeline.load_pipeline (fp16 on a GPU). batch_size: images per encoder
    call (profile.feature_batch_size); it does not change the cache, so it can change between runs.
    Raises DiskFull (naming the file) when the disk is full, FeatureCacheError when the GPU runs out of memory;
    the old file stays as it was in both cases.

    Under a launch of several processes (torchrun, accelerate launch: helpers.support.ranks) every process calls
    it: the jobs (the batches a single process encodes, and the null features) are dealt out, each process
    writes each of its jobs to a share of its own (out_dir/.<filename>.share-rows-S-E, .share-null; hidden, but
    not a name the lock's clean-up of temporaries removes), and the main process merges them into the cache
    (the same batches, so the same tensors as one process makes) and deletes them. Shares of this fingerprint
    left by a launch that was killed are used, by any number of processes, and their jobs skipped.
    """
    path = Path(out_dir) / filename
    meta = feature_fingerprint(split, base_model=base_model, ip_adapter=ip_adapter, image_encoder=image_encoder,
                               resolution=resolution)
    if holds(path, {"fingerprint": meta["fingerprint"]}):
        return path
    if len(split) == 0:
        raise ValueError("cache_features: the split is empty")
    with FolderLock(out_dir, "caching features") as lock:
        ranks.wait_for_everyone()  # every process holds the lock (its clean-up of temporaries done) before writing
        if holds(path, {"fingerprint": meta["fingerprint"]}):  # another writer built it while this one waited
            return path
        jobs = [(s, min(s + batch_size, len(split))) for s in range(0, len(split), batch_size)] + [NULL_JOB]
        shared = ranks.world_size() > 1
        todo = [j for j in jobs if not holds(_share_path(path, j), {"fingerprint": meta["fingerprint"]})]
        mine = ranks.my_share(todo)
        encoded, about = {}, None
        if mine:
            pipe = load_pipeline(base_model, ip_adapter, variant="vanilla", image_encoder=image_encoder, device=device)
            about = {"fingerprint": meta["fingerprint"], "scaling_factor": str(pipe.vae.config.scaling_factor),
                     "device": str(pipe.device)}
            try:
                encoded = _encode_jobs(pipe, split, mine, path, resolution, progress and ranks.is_main(), lock.beat,
                                       write=about if shared else None)
            except torch.cuda.OutOfMemoryError:
                encoded = None  # raised below, outside this block: the traceback's frames hold the batch's activations
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if encoded is None:
                raise _out_of_memory(path, batch_size, "caching features")
        ranks.wait_for_everyone()  # every share written
        if ranks.is_main():
            tensors, made_by = _merge_jobs(path, jobs, encoded)
            about = about or made_by
            meta.update(ids=json.dumps(list(split["id"])), scaling_factor=about["scaling_factor"],
                        device=about["device"])
            check_space(path.parent, _nbytes(tensors), what=f"the feature cache {path}")
            from safetensors.torch import save_file

            with replacing(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
            for share in path.parent.glob(f".{path.name}{SHARE_MARK}*"):
                share.unlink(missing_ok=True)  # after the cache is in place: a crash before leaves them for a rerun
        ranks.wait_for_everyone()  # the cache is there for every process
    return path


NULL_JOB = "null"  # the job of the null features; the others are (first row, end row) batches
SHARE_MARK = ".share-"  # .<cache file name>.share-rows-S-E / .share-null: one job's tensors, not merged yet


def _share_path(path: Path, job) -> Path:
    """Where a process of a launch writes one job of cache_features: .<filename>.share-null / .share-rows-S-E."""
    return path.with_name(f".{path.name}{SHARE_MARK}" + (job if job == NULL_JOB else f"rows-{job[0]}-{job[1]}"))


def _encode_jobs(pipe, split, jobs, path: Path, resolution: int, progress: bool, beat, *, write: dict | None) -> dict:
    """{job: its tensors (fp16, CPU)} for jobs of cache_features: NULL_JOB (null_features) or a batch (first row,
    end row; encode_batch). write: metadata to write each job to its share with (helpers.support.atomic) rather
    than keep it (then {}). After the first batch, checks that the cache (and the shares) will fit on the disk
    (DiskFull naming path before the rest is encoded)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out, checked = {}, False
    n_rows = sum(j[1] - j[0] for j in jobs if j != NULL_JOB)
    with torch.no_grad(), tqdm(total=n_rows, desc="caching features", unit="img", disable=not progress) as bar:
        for job in jobs:
            if job == NULL_JOB:
                feats = null_features(pipe)
            else:
                rows = split[job[0]:job[1]]
                feats = encode_batch(pipe, rows["image"], rows["text"], resolution)
                for k, v in feats.items():
                    if not torch.isfinite(v).all():
                        raise FloatingPointError(f"non-finite {k} for rows {rows['id']} (dtype {v.dtype}); "
                                                 "try device='cpu' (fp32)")
            feats = {k: v.to("cpu", torch.float16).contiguous() for k, v in feats.items()}
            if job != NULL_JOB and not checked:  # fp16 bytes per row, times the rows (twice with shares)
                per_row = _nbytes({k: v[0] for k, v in feats.items()})
                check_space(path.parent, int(per_row * len(split) * (2 if write else 1)),
                            what=f"the feature cache {path}")
                checked = True
            if write is not None:
                with replacing(_share_path(path, job)) as tmp:
                    save_file(feats, str(tmp), metadata=write)
            else:
                out[job] = feats
            if job != NULL_JOB:
                bar.update(job[1] - job[0])
            beat()
    return out


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _merge_jobs(path: Path, jobs, encoded: dict) -> tuple[dict, dict]:
    """The cache's tensors from all of cache_features' jobs, in order: those in `encoded`, the others read from
    their shares; and the metadata of the last share read (the scaling_factor and device of the process that
    made it; {} when none was read)."""
    from safetensors import safe_open

    parts, made_by = dict(encoded), {}
    for job in jobs:
        if job not in parts:
            with safe_open(str(_share_path(path, job)), framework="pt") as f:
                parts[job], made_by = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    batches = [parts[j] for j in jobs if j != NULL_JOB]
    tensors = {k: torch.cat([b[k] for b in batches]).contiguous() for k in batches[0]}
    tensors.update(parts[NULL_JOB])
    return tensors, made_by


def _out_of_memory(path: Path, batch_size: int, what: str) -> FeatureCacheError:
    smaller = max(1, batch_size // 2)
    return FeatureCacheError(
        f"out of GPU memory while {what} for {path} at batch size {batch_size} (images per encoder call). Lower "
        f"the feature batch size, e.g. to {smaller}: profile.feature_batch_size (get_profile(..., "
        f"feature_batch_size={smaller}), or profile.replace(feature_batch_size={smaller})), or the batch_size "
        "argument of cache_features, and run the same cell or command again. Each image is encoded on its own, "
        "so a smaller batch gives the same features (up to fp16 rounding) and nothing else has to change; the old "
        "cache file, if any, is kept. Free other notebooks' GPU memory first (Runtime > Restart).")


def load_feature_cache(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by cache_features; tensors are fp16 on the CPU."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature cache here; build it with cache_features or prepare_for_training")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != "ipa-feature-cache":
            raise ValueError(f"{path}: not a feature cache written by helpers.data.features.cache_features")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


MIRROR_VERSION = "1"  # bump when mirror features would come out different


def variant_cache_path(cache_path, name: str) -> Path:
    """Where cache_image_variant keeps the `name` features of a feature cache: <stem>_<name>.safetensors beside it."""
    cache_path = Path(cache_path)
    return cache_path.with_name(f"{cache_path.stem}_{name}.safetensors")


def mirror_cache_path(cache_path) -> Path:
    """Where cache_mirror_features keeps the mirror features of a feature cache: <stem>_mirror.safetensors beside it."""
    return variant_cache_path(cache_path, "mirror")


def cache_image_variant(split, cache_path, name: str, transform, *, version: str, extra_meta: dict[str, str] | None = None,
                        base_model, ip_adapter, image_encoder=None, resolution: int, batch_size: int = 16, device=None,
                        progress: bool = True) -> Path:
    """Image-encoder features of every row of `split` with its picture changed by `transform`, written beside the
    feature cache `cache_path` (variant_cache_path(cache_path, name)) and returned as a path.

    transform(i, image) -> PIL RGB: row i's picture after the cache's preprocessing (center_square at
    `resolution`, RGB) as the encoder should see it (mirror: flipped; helpers.train.masking: background filled).
    Tensor: "{name}_image_embeds" (N, 257, 1280) fp16, rows in the cache's order: encode_images of the changed
    pictures, the same preprocessing as the cache's image_embeds.
    A file of its own rather than more tensors in the cache: the cache's fingerprint decides reuse for every
    run, and a cache whose contents depended on a training option would need that option in its fingerprint
    (a full rebuild, VAE included, whenever such a run comes and goes). This file records the cache's
    fingerprint instead, with `version` and `extra_meta` (what else the pictures depend on, e.g. the masks'
    fingerprint): it is reused while all of them are unchanged and rebuilt otherwise (one image-encoder pass).
    It is built under the same lock, disk and memory rules as cache_features.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    cache_path = Path(cache_path)
    if not cache_path.is_file():
        raise FileNotFoundError(f"{cache_path}: no feature cache here; build it with prepare_for_training first")
    with safe_open(str(cache_path), framework="pt") as f:
        cache_meta = dict(f.metadata() or {})
    if json.loads(cache_meta["ids"]) != list(split["id"]):
        raise ValueError(f"{cache_path}: its rows are not this split's (ids differ); rebuild it with "
                         "prepare_for_training on the same data folder")
    path = variant_cache_path(cache_path, name)
    meta = {"format": f"ipa-{name.replace('_', '-')}-features", "version": version,
            "cache_fingerprint": cache_meta["fingerprint"], "ids": cache_meta["ids"], **(extra_meta or {})}
    if holds(path, meta):
        return path
    with FolderLock(path.parent, f"caching {name} features") as lock:  # the same rules as cache_features
        if holds(path, meta):
            return path
        pipe = load_pipeline(base_model, ip_adapter, variant="vanilla", image_encoder=image_encoder, device=device)
        chunks = []
        try:
            with torch.no_grad(), tqdm(total=len(split), desc=f"{name} features", unit="img", disable=not progress) as bar:
                for s in range(0, len(split), batch_size):
                    images = [transform(s + k, center_square(im.convert("RGB"), resolution))
                              for k, im in enumerate(split[s:s + batch_size]["image"])]
                    chunks.append(encode_images(pipe, images).to("cpu", torch.float16))
                    bar.update(len(images))
                    lock.beat()
        except torch.cuda.OutOfMemoryError:
            chunks = None  # raised below, outside this block (see cache_features)
        del pipe
        if chunks is None:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise _out_of_memory(path, batch_size, f"caching {name} features")
        tensors = {f"{name}_image_embeds": torch.cat(chunks).contiguous()}
        check_space(path.parent, _nbytes(tensors), what=f"the {name} features {path}")
        with replacing(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    return path


def cache_mirror_features(split, cache_path, *, base_model, ip_adapter, image_encoder=None, resolution: int,
                          batch_size: int = 16, device=None, progress: bool = True) -> Path:
    """Image-encoder features of every row of `split` mirrored left to right (helpers.train.pairing's `mirror`
    pairing), written beside the feature cache `cache_path` (mirror_cache_path) and returned as a path.

    Tensor: mirror_image_embeds (N, 257, 1280) fp16, rows in the cache's order: encode_images of
    ImageOps.mirror(center_square(image)), the same preprocessing as the cache's image_embeds
    (cache_image_variant: reused while the cache is unchanged, rebuilt with it).
    """
    from PIL import ImageOps

    return cache_image_variant(split, cache_path, "mirror", lambda i, image: ImageOps.mirror(image),
                               version=MIRROR_VERSION, base_model=base_model, ip_adapter=ip_adapter,
                               image_encoder=image_encoder, resolution=resolution, batch_size=batch_size,
                               device=device, progress=progress)


def prepare_for_training(profile, data_dir, *, device=None, progress: bool = True, announce: bool = True,
                         dataset=None, resolution: int | None = None,
                         test_fraction: float | None = None) -> tuple[PreparedData, Path]:
    """Everything training needs: notebook 01's prepared data in data_dir, read as it is (helpers.data.prepare.use_prepared:
    prepared from the profile's dataset only if missing; dataset / resolution / test_fraction, when given, must
    match it), and the train split's feature cache data_dir/train_features.safetensors at the data's resolution
    with the profile's models, built only if missing or stale. Returns (prep, path).
    Raises PreparedDataMismatch (PreparedDataDamaged for unreadable files), FolderInUse (another writer holds
    data_dir), DiskFull or FeatureCacheError, each naming the folder or file and what to do.
    Under a launch of several processes every process calls it: the main process prepares the data first (the
    others then read it), and all of them share the cache's encoding (cache_features)."""
    with ranks.main_first():
        prep = use_prepared(data_dir, profile, dataset=dataset, resolution=resolution, test_fraction=test_fraction,
                            announce=announce, progress=progress)
    path = cache_features(prep.train, data_dir, base_model=profile.base_model, ip_adapter=profile.ip_adapter,
                          image_encoder=profile.image_encoder, resolution=prep.info["resolution"],
                          batch_size=profile.feature_batch_size, device=device,
                          filename=TRAIN_FEATURES, progress=progress)
    return prep, path
