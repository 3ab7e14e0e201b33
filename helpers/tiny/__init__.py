"""The tiny profile's stand-ins, built offline (`python -m helpers.tiny`), and real shapes with random weights.

    assets.py     every tiny model (SD 1.5 layout, IP-Adapter Plus file, CLIP, DINO) and the dataset, built once
    tokenizer.py  a small CLIP BPE vocabulary in which the captions' words are single tokens
    cartoons.py   the synthetic dataset: drawn characters with captions, and their mirrors
    shapes.py     Stable Diffusion 1.5 / IP-Adapter Plus at their real sizes with random weights (benchmarks)
"""
