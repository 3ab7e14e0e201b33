"""Notebook 01: the drawings, cleaned, split without leakage, the features training reads, and masks.

    sources.py          read a source (Hub dataset, folder, parquet, images + metadata.jsonl) into items
    images.py           decode and check one image, convert it to RGB, crop it square
    captions.py         captions for images that have none (BLIP), and caption token counts
    duplicates.py       the idea of the split: dHash of each image and its mirror, near-duplicate groups, split by group
    prepare.py          the five steps in order (prepare_dataset), and the prepared folder as the notebooks' contract
    prepared_folder.py  the prepared folder's layout (prepared.json, PreparedData), a new preparation swapped in whole
    fingerprints.py     what a stored file was made from (model stamps, row fingerprints), so it is reused exactly
    features.py         the feature cache: VAE latents, image and text features of every training row, once
    subjects.py         which words of a caption or prompt name its subject (one rule: Conceptrol, CLIPSeg)
    masks.py            each row's character mask: the user's own (alpha, MASKS folder) or CLIPSeg's, stored once
    mask_file.py        the stored masks file's layout, and Masks, the object a row's mask is read back from
"""

_ENTRY_POINTS = {"prepare_dataset", "load_prepared", "use_prepared"}


def __getattr__(name):  # the entry points, imported on first use so that `helpers.data.duplicates` stays light
    if name in _ENTRY_POINTS:
        from . import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
