"""Shared code of the notebook series, one folder per stage (docs/architecture.md draws the whole house):

    data/      01  the drawings: read, check, caption, find mirrors, split by group, cache the features
    model/     02  the idea (block.py: the text-image cross-attention), the adapter file, loading a pipeline
    train/     03  the objective (loss.py), pairing, one training step, the loop, checkpoints
    sample/    04  the models compared (registry, bank), generating, references, galleries, the widget panel
    evaluate/  05  CLIP-T / CLIP-I / DINO, the protocol, the grid, the statistics (stats.py), the plots
    share/         the model card and the Hub upload
    profile.py     which models, data and sizes a run uses: `full` (Colab) or `tiny` (CI, random weights)
    support/       devices, environment, loading errors, library quirks, atomic writes, locks, disk space, names
    tiny/          the tiny profile's models and data (SD 1.5 at its real size lives beside the benchmarks, bench/)

No module imports one that imports it back (tests/test_imports.py). The stage packages export their entry
points: helpers.data.prepare.prepare_dataset, helpers.model.load_pipeline / save_adapter, helpers.train.train (and
`python -m helpers.train`), helpers.evaluate.clip_t / clip_i.
"""
