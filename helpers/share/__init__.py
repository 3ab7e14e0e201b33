"""Sharing a trained adapter (notebook 03's last section; `python -m helpers.share`).

    run_info.py  what a run folder and notebook 05 say about one adapter, read without loading a model
    card.py      the model card (huggingface_hub.ModelCard): metadata, how to load it, the recipe, the results
    hub.py       the upload folder, and the push
"""
