"""Which words of a prompt name its subject: one rule for every caller. Conceptrol's textual concept
(helpers.model.conceptrol: the evaluation's prompts, the sampling panel, `generate`) and CLIPSeg's prompt for
each image's mask (helpers.data.masks, from the image's caption, with MASK_SUBJECT_DEFAULT).

    subject_of("a watercolor painting of a cartoon character")     -> "cartoon character"
    subject_of("a cartoon drawing of a boy with blue hair ...")    -> "boy"
    subject_of("in space")                                         -> "in space"  (none named: the whole prompt)
    find_subject("in space")                                       -> Subject("in space", WHOLE_PROMPT)
    subject_of("in space", default="a cartoon character")          -> "a cartoon character"

The rule: the prompt's words up to the first word that starts a description (with, in, on, wearing, ...,
`SUBJECT_ENDS`); within them, what follows the last "of" ("a painting of X": X is the subject); leading articles
dropped. The evaluation's edit prompts all name their subject "a cartoon character"; a reference's own caption
(BLIP's: "a cartoon of a man with ...") names it at its start.

When no words name a subject, the fallback is the whole prompt, unless the caller states a `default`:
- For Conceptrol the whole prompt is the honest fallback. Its mask is the prompt's own attention to words
  *of the prompt* (token positions), so a stand-in subject the prompt does not contain ("a cartoon character")
  cannot be masked by at all; the whole prompt invents nothing (the mask is where the picture attends to what
  the prompt says) and never runs Conceptrol unmasked. Raising instead, as the authors' code does when the
  concept is not in the prompt (`tokens.index` in `load_textual_concept`), would drop Conceptrol from those
  rows of a paired grid. The fallback is never silent: `find_subject` says how the words were found, notebook
  05's prompt table lists such prompts, the panel shows it, and each Sample records the words it used.
- A segmenter that reads any text (CLIPSeg) can take a stated default instead: MASK_SUBJECT_DEFAULT.
"""

from __future__ import annotations

import re
from typing import NamedTuple

SUBJECT_ENDS = frozenset(
    "with in on at near under over by from into inside behind beside next wearing holding riding playing "
    "standing sitting walking running jumping flying waving smiling looking and or is are was who that which "
    "while during".split())
ARTICLES = frozenset({"a", "an", "the"})
MASK_SUBJECT_DEFAULT = "a cartoon character"  # CLIPSeg's prompt for a caption that names no subject

FOUND = "subject"  # Subject.how when the rule found subject words
WHOLE_PROMPT = "whole prompt: no subject found"  # ... when none were, and no default was given
DEFAULT = "stated default: no subject found"  # ... when none were, and the caller's default was used


class Subject(NamedTuple):
    """The words naming a prompt's subject, and how they were found (FOUND, WHOLE_PROMPT or DEFAULT)."""

    words: str
    how: str


def find_subject(prompt: str, *, default: str | None = None) -> Subject:
    """The subject of `prompt` by the module's rule; when no words name one, `default` if given, else the
    whole prompt (see the module docstring for why)."""
    words = re.findall(r"[\w'-]+|[^\w\s]", prompt)
    head = []
    for word in words:
        if word.lower() in SUBJECT_ENDS or not re.match(r"\w", word):
            break
        head.append(word)
    lowered = [w.lower() for w in head]
    if "of" in lowered:
        head = head[len(lowered) - lowered[::-1].index("of"):]
    while head and head[0].lower() in ARTICLES:
        head = head[1:]
    if head:
        return Subject(" ".join(head), FOUND)
    return Subject(prompt, WHOLE_PROMPT) if default is None else Subject(default, DEFAULT)


def subject_of(prompt: str, *, default: str | None = None) -> str:
    """The words of `prompt` that name its subject, as they appear in it: find_subject(...).words."""
    return find_subject(prompt, default=default).words
