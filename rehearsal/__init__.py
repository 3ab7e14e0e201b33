"""Offline rehearsal of the `full` profile: a local mirror of the Hub repos it names (`build_mirror`).

Nothing in `helpers/` or the notebooks knows about this package: the rehearsal only points the Hugging
Face caches at the mirror (HF_HUB_CACHE, HF_DATASETS_CACHE) and turns the libraries' offline mode on, as a
user whose caches were filled by an earlier online run would.
"""
