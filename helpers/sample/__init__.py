"""Notebook 04: the models side by side.

    registry.py    the models compared, by name (what each is, where its weights come from); nothing heavy
    bank.py        those models over one shared pipeline, and IP-Adapter scales set and read back
    generate.py    images for models x scales x references x prompts x seeds, one generator per image
    references.py  the one rule for held-out references
    gallery.py     samples laid out as a labelled grid
    saved.py       samples on disk with the settings that made them
    widgets.py     the interactive panel (ipywidgets 7 and 8)
    mask_view.py   the panel's reference mask: which mask, and the preview drawn with it
    uploads.py     a reference image from an upload (FileUpload 7 and 8, Colab's dialog)
"""
