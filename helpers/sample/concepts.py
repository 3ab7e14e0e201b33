"""Which words of a prompt name its subject: Conceptrol's textual concept (helpers.model.conceptrol).

    subject_of("a watercolor painting of a cartoon character")     -> "cartoon character"
    subject_of("a cartoon drawing of a boy with blue hair ...")    -> "boy"

The rule: the prompt's words up to the first word that starts a description (with, in, on, wearing, ...,
`SUBJECT_ENDS`); within them, what follows the last "of" ("a painting of X": X is the subject); leading articles
dropped. The evaluation's edit prompts all name their subject "a cartoon character"; a reference's own caption
(BLIP's: "a cartoon of a man with ...") names it at its start. A prompt with no such words raises
ConceptNotFound: the caller reports it, and never runs Conceptrol unmasked.
"""

from __future__ import annotations

import re

from ..model.conceptrol import ConceptNotFound

SUBJECT_ENDS = frozenset(
    "with in on at near under over by from into inside behind beside next wearing holding riding playing "
    "standing sitting walking running jumping flying waving smiling looking and or is are was who that which "
    "while during".split())
ARTICLES = frozenset({"a", "an", "the"})


def subject_of(prompt: str) -> str:
    """The words of `prompt` that name its subject, as they appear in it (see the module docstring)."""
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
    if not head:
        raise ConceptNotFound(prompt, "", "no words before the description name a subject (the rule: "
                                          "helpers.sample.concepts.subject_of); give it: concepts={prompt: words}")
    return " ".join(head)
