"""The tiny profile's tokenizer: CLIP's byte-level BPE with a small vocabulary in which the words of our captions
are single tokens (attention maps then read word by word).

    save_tokenizer(folder)     vocab.json + merges.txt, loaded back with transformers' CLIPTokenizer
"""

from __future__ import annotations

import json
from pathlib import Path

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


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
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


def save_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tok.save_pretrained(folder)
    return tok
