"""helpers.data.subjects: one subject-word rule, the same for the evaluation, the panel and generate."""
import pytest

from helpers.evaluate.protocol import build_prompts, concept_of
from helpers.evaluate.stats import OWN
from helpers.sample.bank import load_models
from helpers.data.subjects import DEFAULT, FOUND, WHOLE_PROMPT, find_subject, subject_of
from helpers.sample.generate import generate
from helpers.sample.references import Reference
from helpers.sample.widgets import SamplingPanel

NAMED = "a cartoon drawing of a girl with red hair"  # names its subject: "girl"
UNNAMED = "in space"  # names none: a description from its first word


@pytest.mark.parametrize("prompt, words", [
    ("a watercolor painting of a cartoon character", "cartoon character"),
    ("a cartoon of a man with a beard", "man"),
    ("The robot, smiling", "robot"),
    (NAMED, "girl"),
])
def test_the_subject_is_before_the_description_and_after_the_last_of(prompt, words):
    assert find_subject(prompt) == (words, FOUND)


def test_a_prompt_naming_no_subject_falls_back_to_itself_or_to_a_stated_default():
    assert find_subject(UNNAMED) == (UNNAMED, WHOLE_PROMPT)
    assert find_subject("a painting of, in blue") == ("a painting of, in blue", WHOLE_PROMPT)
    assert find_subject(UNNAMED, default="a cartoon character") == ("a cartoon character", DEFAULT)
    assert subject_of(NAMED, default="a cartoon character") == "girl"  # a default only where none is named


def test_the_evaluation_the_panel_and_generate_agree(tiny_profile, reference_image):
    """The three callers of the rule give the same words, on a prompt with a subject and on one without (they
    disagreed once: the whole prompt, None, and an error)."""
    bank = load_models(tiny_profile, None, device="cpu", verbose=False, baselines=["pretrained-conceptrol"])
    panel = SamplingPanel(bank, {"r": reference_image})
    for prompt in (NAMED, UNNAMED):
        evaluation = {s.kind: s.concept for s in build_prompts([Reference("r", reference_image, prompt)], [NAMED], 0)}
        panel.prompt.value = prompt
        sample, = generate(bank, {"r": reference_image}, [prompt], models=["pretrained-conceptrol"], steps=1,
                           progress=False)
        assert evaluation[OWN] == concept_of(prompt).words == panel.settings()["concept"] == sample.concept \
            == subject_of(prompt), prompt
    assert panel.settings()["concept"] == UNNAMED and "whole prompt: no subject found" in panel.settings_view.value
    panel.concept.value = "space"  # typed words win, in the panel and in generate
    assert panel.settings()["concept"] == "space" and "space (typed)" in panel.settings_view.value
