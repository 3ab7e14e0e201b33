"""Tokenizer vocabularies for the mirror: CLIP's real BPE (from open_clip's wheel) and a BERT stand-in.

CLIP (SD 1.5's tokenizer and openai/clip-vit-large-patch14) uses OpenAI's byte-level BPE. The PyPI package
open_clip_torch ships it as `bpe_simple_vocab_16e6.txt.gz`; Hugging Face's `vocab.json` and `merges.txt`
are derived from it exactly as below (checked byte for byte against the files in both Hub repos):

    merges = lines[1 : 49152 - 256 - 2 + 1]                       48,894 merge rules
    vocab  = 256 byte symbols + the same with '</w>' + one token per merge + <|startoftext|>, <|endoftext|>
                                                                   = 49,408 ids (49406, 49407 special)

When the wheel cannot be had (no index reachable), a stand-in of the same format is written: the same byte
symbols, merges learned on a few caption words, padding tokens up to 49,406 and the two specials at their
real ids. BLIP's BERT WordPiece vocabulary (bert-base-uncased) ships in no PyPI package we may use, so it
is always a stand-in with the real size (30,522) and the real ids of [PAD] 0, [UNK] 100, [CLS] 101,
[SEP] 102, [MASK] 103.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from helpers.tiny.tokenizer import bytes_to_unicode

CLIP_VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BERT_VOCAB_SIZE = 30522


def _open_clip_bpe(download_dir: Path) -> bytes | None:
    """The gzipped BPE file: from an installed open_clip, a wheel already in download_dir, or a fresh
    `pip download --no-deps open_clip_torch` into download_dir. None when none of these works."""
    try:
        import open_clip  # noqa: F401

        path = Path(open_clip.__file__).parent / BPE_FILE
        if path.is_file():
            return path.read_bytes()
    except ImportError:
        pass
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download_dir.glob("open_clip_torch-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "open_clip_torch",
                        "-d", str(download_dir)], capture_output=True, timeout=300, check=False)
        wheels = sorted(download_dir.glob("open_clip_torch-*.whl"))
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            name = next((n for n in z.namelist() if n.endswith("/" + BPE_FILE)), None)
            if name:
                return z.read(name)
    return None


def clip_bpe(download_dir: Path) -> tuple[dict[str, int], list[str], str]:
    """(vocab token -> id, merge lines, where it came from)."""
    gz = _open_clip_bpe(download_dir)
    base = list(bytes_to_unicode().values())
    base = base + [b + "</w>" for b in base]
    if gz is not None:
        lines = gzip.decompress(gz).decode("utf-8").split("\n")
        merges = lines[1:49152 - 256 - 2 + 1]
        tokens = base + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        return {t: i for i, t in enumerate(tokens)}, merges, "real (derived from open_clip_torch's " + BPE_FILE + ")"
    merges, tokens = _learned_merges(base)
    tokens += [f"<|unused{i}|>" for i in range(CLIP_VOCAB_SIZE - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges, "STAND-IN (open_clip_torch could not be downloaded)"


def _learned_merges(base: list[str]) -> tuple[list[str], list[str]]:
    """Plain BPE training on a few caption words (the stand-in): merge the most frequent pair until each
    word is one token."""
    from collections import Counter

    from helpers.tiny.tokenizer import WORDS

    tokens = list(base)
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(WORDS)]
    merges = []
    while any(len(w) > 1 for w in words):
        (a, b), _ = max(Counter(p for w in words for p in zip(w, w[1:])).items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        if a + b not in tokens:
            tokens.append(a + b)
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == (a, b):
                    out.append(a + b)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    return merges, tokens


def write_clip_tokenizer_files(folder: Path, vocab: dict[str, int], merges: list[str], *, vocab_style: str) -> None:
    """vocab.json + merges.txt as the Hub repos hold them. vocab_style "sd" (stable-diffusion-v1-5: indent 2,
    sorted keys) or "openai" (openai/clip-vit-large-patch14: one line, id order)."""
    folder.mkdir(parents=True, exist_ok=True)
    if vocab_style == "sd":
        text = json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    else:
        text = json.dumps(vocab, ensure_ascii=False)
    (folder / "vocab.json").write_text(text, encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def bert_vocab_standin(clip_vocab: dict[str, int]) -> list[str]:
    """30,522 WordPiece entries with bert-base-uncased's special ids; the words are CLIP's whole-word tokens
    (lower-case letters), so BLIP's stand-in tokenizer splits real English sensibly."""
    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    out = [specials.get(i, f"[unused{i - 1 if i < 100 else i - 5}]") for i in range(104)]
    chars = [chr(c) for c in range(33, 127)]
    out += chars + ["##" + c for c in chars if c.isalnum()]
    seen = set(out)
    for tok in clip_vocab:
        word = tok[:-4] if tok.endswith("</w>") else None
        if word and re.fullmatch(r"[a-z]{2,}", word) and word not in seen:
            out.append(word)
            seen.add(word)
            if len(out) == BERT_VOCAB_SIZE:
                break
    out += [f"[pad{i}]" for i in range(BERT_VOCAB_SIZE - len(out))]
    return out[:BERT_VOCAB_SIZE]


def write_bert_vocab(folder: Path, tokens: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m rehearsal.vocab: where the CLIP vocabulary would come from
    v, m, source = clip_bpe(Path(tempfile.gettempdir()) / "ipa-rehearsal-downloads")
    print(f"{len(v)} tokens, {len(m)} merges: {source}")
