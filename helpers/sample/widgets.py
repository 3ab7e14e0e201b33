"""An ipywidgets panel to compare the models side by side: reference + prompt + settings -> one image per model.

Only ipywidgets, and code that works on both 7.7 (Colab) and 8. The logic is in `SamplingPanel`'s plain
methods (`generate`, `save`, `select`, `add_reference`, `load_path`, `colab_upload`, `reference_mask`,
`preview_image`) and `parse_upload`, which the buttons and observers call; everything they produce is kept as
attributes (`last_samples`, `last_images`, `last_saved`, `last_error`, `last_mask`, `last_mask_source`,
`status.value`, `settings_view.value`), because a headless kernel (tests, nbval) never shows widget output.
Every name, path, prompt or message put into an HTML widget is escaped (html.escape): a model name or file
name such as `<b>` or `a & b` shows as typed.

    panel = SamplingPanel(bank, references, scale=0.7, out_dir=env.output_root / "samples" / "panel")
    panel.ui                     # display it (last expression of a cell)
    panel.prompt.value = "..."   # or set the widgets from code,
    panel.generate()             # press the buttons from code, and read
    panel.last_images            # {model name: PIL image}

The reference's mask ("show mask" over the preview, "background removed" for the adapters) and which mask a
reference gets: helpers.sample.mask_view, whose MaskView the panel inherits.

Your own reference image, three ways: the Upload button (ipywidgets' FileUpload; in Colab it silently loses
files over about 1 MB, jupyter-widgets/ipywidgets issue 3452, and an upload that arrives empty is reported
as such), a path typed in the Path box (e.g. a file on the mounted Google Drive), or, in Colab only, the
"Upload (Colab)" button, which uses Colab's own `google.colab.files.upload()` and has no size limit.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import ipywidgets as widgets
from PIL import Image

from ..data.images import png_bytes
from ..data.subjects import FOUND, find_subject, subject_of
from ..support.env import in_colab
from .bank import ModelBank
from .generate import GALLERY_PROMPTS, Sample, generate
from .mask_view import MaskView
from .saved import save_samples
from .uploads import COLAB_UPLOAD_LIMIT, UPLOAD_PREFIX, parse_upload


def _thumbnail(image: Image.Image, size: int) -> bytes:
    im = image.convert("RGB").copy()
    if im.width < size:  # tiny profile: 64 px drawings, shown larger without blur
        im = im.resize((size, size), Image.NEAREST)
    im.thumbnail((size, size))
    return png_bytes(im)


class SamplingPanel(MaskView):
    """The interactive comparison panel (see the module docstring). Widgets are public attributes:
    reference (Dropdown), upload (FileUpload), path + path_button, colab_button (shown in Colab only), prompt,
    negative_prompt, scale, seed, steps, guidance, model_boxes ({name: Checkbox}), generate_button,
    save_button, progress (counts denoising steps), settings_view (the current settings, in words), status;
    `ui` holds them all.

    references: {id: PIL image}; captions: {id: caption} for the thumbnails and the dropdown (default: the
    references' own `.captions`, as helpers.sample.references.held_out_references returns them); scale: the IP scale
    the slider starts at (the notebook's SCALE). masks: notebook 01's stored masks (helpers.data.masks.load_masks),
    whose test-split rows the references' masks come from; segmenter (Hub id, folder or loaded Segmenter) and
    threshold for the others: the profile's by default. show_mask and remove_background are the two mask
    checkboxes, mask_note says under the preview which mask it shows.
    """

    def __init__(self, bank: ModelBank, references: dict[str, Image.Image] | None = None, *, out_dir=None,
                 prompt: str = GALLERY_PROMPTS[1], scale: float = 1.0, captions: dict[str, str] | None = None,
                 masks=None, segmenter=None, threshold: float | None = None,
                 thumbnails: int = 8, thumb_size: int = 112, image_size: int = 256):
        self.bank = bank
        self.references = {str(k): v.convert("RGB") for k, v in (references or {}).items()}
        captions = captions if captions is not None else getattr(references, "captions", {})
        self.captions = {str(k): str(v) for k, v in captions.items()}
        self._init_masks(masks, bank.profile.segmenter if segmenter is None else segmenter,
                         bank.profile.mask_threshold if threshold is None else threshold)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.image_size = image_size
        self.last_samples: list[Sample] = []
        self.last_images: dict[str, Image.Image] = {}
        self.last_saved: list[Path] = []
        self.last_error: str | None = None
        pick = self._reference_widgets(thumbnails, thumb_size)
        controls = self._setting_widgets(prompt, scale)
        results = self._result_widgets()
        notes = ([f"Profile {bank.profile.name}: random weights, the pictures are noise."] if bank.profile.random_weights
                 else []) + bank.missing_notes()
        self.notes = widgets.HTML(value="<br>".join(f"<i>{html.escape(n)}</i>" for n in notes))
        self.ui = widgets.VBox([self.notes, pick, self.thumbnails, widgets.HBox([controls, self.settings_view]),
                                widgets.HBox([self.generate_button, self.save_button, self.progress]), self.status,
                                results])
        self._on_reference(None)
        self._show_settings(None)

    def _reference_widgets(self, thumbnails: int, thumb_size: int):
        """The reference: a dropdown (the state), thumbnails with their captions, three ways to add one, a preview."""
        W = widgets
        self.reference = W.Dropdown(options=[(self._label(r), r) for r in self.references], description="Reference",
                                    value=next(iter(self.references), None), layout=W.Layout(width="420px"))
        self.preview = W.Image(value=b"", format="png", width="128")
        self.show_mask = W.Checkbox(value=False, description="show mask", indent=False,
                                    tooltip="the reference's mask over it: the character kept, the rest tinted")
        self.remove_background = W.Checkbox(value=False, description="background removed", indent=False,
                                            tooltip="the adapters see the reference with everything off its mask white")
        self.mask_note = W.HTML(value="", layout=W.Layout(width="200px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="Upload")
        self.path = W.Text(value="", placeholder="/content/drive/MyDrive/drawing.png", description="Path")
        self.path_button = W.Button(description="Load path", icon="folder-open")
        self.colab_button = W.Button(description="Upload (Colab)", icon="upload", tooltip="no size limit",
                                     layout=W.Layout(display=None if in_colab() else "none"))
        upload_note = W.HTML(value=f"<small>Large file? {html.escape(COLAB_UPLOAD_LIMIT.split(': ', 1)[1])}.</small>")
        thumbs = []
        for ref_id in list(self.references)[:thumbnails]:
            caption = self.captions.get(ref_id, ref_id)
            button = W.Button(description="use", tooltip=caption, layout=W.Layout(width=f"{thumb_size}px"))
            button.on_click(lambda _b, ref_id=ref_id: self.select(ref_id))
            text = W.HTML(value=f"<div style='font-size:11px;line-height:1.2'>{html.escape(caption)}</div>",
                          layout=W.Layout(width=f"{thumb_size}px"))
            thumbs.append(W.VBox([W.Image(value=_thumbnail(self.references[ref_id], thumb_size), format="png",
                                          width=str(thumb_size)), button, text]))
        self.thumbnails = W.HBox(thumbs, layout=W.Layout(flex_flow="row wrap"))
        self.reference.observe(self._on_reference, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.path_button.on_click(lambda _b: self._guard(lambda: self.load_path(self.path.value)))
        self.colab_button.on_click(lambda _b: self._guard(self.colab_upload))
        for box in (self.show_mask, self.remove_background):
            box.observe(self._on_reference, names="value")
        return W.HBox([W.VBox([self.reference, W.HBox([self.upload, self.colab_button]),
                               W.HBox([self.path, self.path_button]), upload_note]),
                       W.VBox([self.preview, W.HBox([self.show_mask, self.remove_background]), self.mask_note])])

    def _setting_widgets(self, prompt: str, scale: float):
        """Prompt, IP scale, seed, steps, guidance, models; and beside them what they add up to."""
        W, profile = widgets, self.bank.profile
        wide = W.Layout(width="95%")
        self.prompt = W.Text(value=prompt, description="Prompt", layout=wide)
        self.negative_prompt = W.Text(value="", description="Negative", layout=wide)
        self.concept = W.Text(value="", placeholder="empty: the prompt's subject", description="Concept", layout=wide,
                              tooltip="Conceptrol masks the image by the prompt's attention to these words")
        self.scale = W.FloatSlider(value=scale, min=0.0, max=1.5, step=0.05, description="IP scale")
        self.seed = W.IntText(value=0, description="Seed")
        self.steps = W.IntSlider(value=profile.num_inference_steps, min=1, max=100, description="Steps")
        self.guidance = W.FloatSlider(value=profile.guidance_scale, min=1.0, max=15.0, step=0.5, description="Guidance")
        self.model_boxes = {name: W.Checkbox(value=True, description=_description(name), indent=False)
                            for name in self.bank.names}
        self.settings_view = W.HTML(value="", layout=W.Layout(width="320px"))
        for w in (self.reference, self.prompt, self.negative_prompt, self.concept, self.scale, self.seed, self.steps,
                  self.guidance, self.remove_background, *self.model_boxes.values()):
            w.observe(self._show_settings, names="value")
        for w in (self.prompt, self.concept):  # an upload's mask follows the subject words
            w.observe(self._on_words, names="value")
        self._masks = any(self.bank.models[n].attention for n in self.bank.names)  # a model needs the concept
        return W.VBox([self.prompt, self.negative_prompt, *([self.concept] if self._masks else []),
                       W.HBox([self.scale, self.seed]),
                       W.HBox([self.steps, self.guidance]), W.HBox(list(self.model_boxes.values()))],
                      layout=W.Layout(flex="1 1 auto"))

    def _result_widgets(self):
        """The buttons, the progress bar (denoising steps), the status line, one picture per model."""
        W, names = widgets, self.bank.names
        self.generate_button = W.Button(description="Generate", button_style="primary", icon="play")
        self.save_button = W.Button(description="Save", icon="save", disabled=True)
        self.generate_button.on_click(self._on_generate)
        self.save_button.on_click(self._on_save)
        self.progress = W.IntProgress(value=0, min=0, max=max(1, len(names) * self.bank.profile.num_inference_steps),
                                      description="Denoising")
        self.status = W.HTML(value="")
        self.result_labels = {name: W.HTML(value=f"<b>{html.escape(name)}</b>") for name in names}
        self.result_images = {name: W.Image(value=b"", format="png", width=str(self.image_size)) for name in names}
        return W.HBox([W.VBox([self.result_labels[n], self.result_images[n]]) for n in names])

    # ----------------------------------------------------------------------------------------------
    # plain methods (what the buttons do; tests call them)

    def select(self, ref_id: str) -> None:
        """Make `ref_id` the current reference."""
        if ref_id not in self.references:
            raise KeyError(f"unknown reference {ref_id!r}; known: {list(self.references)}")
        self.reference.value = ref_id

    def add_reference(self, name: str, image: Image.Image) -> str:
        """Add an image (e.g. an upload) as a reference and select it. Returns its id ("upload:<name>")."""
        ref_id = name if name.startswith(UPLOAD_PREFIX) else UPLOAD_PREFIX + name
        self.references[ref_id] = image.convert("RGB")
        self.captions.setdefault(ref_id, f"your image {name.removeprefix(UPLOAD_PREFIX)}")
        options = [value for _, value in self.reference.options]
        if ref_id not in options:
            self.reference.options = list(self.reference.options) + [(self._label(ref_id), ref_id)]
        self.reference.value = ref_id
        self._on_reference(None)  # the value may not have changed (same name uploaded again)
        return ref_id

    def load_path(self, path) -> str:
        """Add the image file at `path` (e.g. on the mounted Google Drive) as a reference and select it."""
        path = Path(str(path).strip()).expanduser()
        if not str(path) or not path.is_file():
            hint = (" (Google Drive files are under /content/drive/MyDrive/ once the settings cell has mounted it)"
                    if in_colab() else "")
            raise FileNotFoundError(f"{path}: no such file{hint}")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001  (PIL raises several types for unreadable data)
            raise ValueError(f"{path}: not an image PIL can read ({e})") from None
        ref_id = self.add_reference(path.name, image)
        self._say(f"Loaded {path} ({image.width} x {image.height})")
        return ref_id

    def colab_upload(self) -> list[str]:
        """Colab's own upload dialog (`google.colab.files.upload()`, no 1 MB limit); adds what it gets."""
        if not in_colab():
            raise RuntimeError("Colab's upload is only available in Google Colab: use Upload or the Path box")
        from google.colab import files  # type: ignore[import-not-found]

        added = [self.add_reference(name, image) for name, image in parse_upload(files.upload())]
        self._say(f"Uploaded {', '.join(added) or 'nothing'}")
        return added

    def settings(self) -> dict:
        """The settings the next Generate will use."""
        return {"reference": self.reference.value, "prompt": self.prompt.value,
                "negative_prompt": self.negative_prompt.value, "scale": float(self.scale.value),
                "concept": self.concept.value.strip() or subject_of(self.prompt.value),
                "seed": int(self.seed.value), "steps": int(self.steps.value), "guidance": float(self.guidance.value),
                "sampler": type(self.bank.pipe.scheduler).__name__,
                "background": "removed" if self.remove_background.value else "kept",
                "models": [name for name, box in self.model_boxes.items() if box.value]}

    def generate(self) -> list[Sample]:
        """One image per ticked model with the current settings, shown as each model finishes; the progress
        bar counts denoising steps. Returns the samples (also kept in last_samples / last_images)."""
        ref_id = self.reference.value
        if ref_id is None:
            raise ValueError("no reference image: pick a test image or upload one")
        models = [name for name, box in self.model_boxes.items() if box.value]
        if not models:
            raise ValueError("no model ticked: tick at least one")
        steps = int(self.steps.value)
        self.progress.max, self.progress.value = len(models) * steps, 0
        for name in self.bank.names:
            self.result_labels[name].value = f"<b>{html.escape(name)}</b>: " + ("waiting..." if name in models
                                                                                else "not ticked")
        masks = {ref_id: self.reference_mask(ref_id)} if self.remove_background.value else None
        samples, start = [], time.perf_counter()
        for i, name in enumerate(models):
            self._say(f"Generating with {name} ({i + 1}/{len(models)})...")
            t = time.perf_counter()
            sample, = generate(
                self.bank, {ref_id: self.references[ref_id]}, [self.prompt.value], models=[name],
                scales=(self.scale.value,), seeds=(int(self.seed.value),), steps=steps,
                guidance=float(self.guidance.value), negative_prompt=self.negative_prompt.value, progress=False,
                concepts={self.prompt.value: self.concept.value.strip()} if self.concept.value.strip() else None,
                masks=masks, on_step=self._step)
            samples.append(sample)
            self.result_images[name].value = png_bytes(_enlarge(sample.image, self.image_size))
            self.result_labels[name].value = f"<b>{html.escape(name)}</b> ({time.perf_counter() - t:.1f} s)"
            self.progress.value = (i + 1) * steps  # a sampler may take a step more or less than asked
        self.last_samples = samples
        self.last_images = {s.model: s.image for s in samples}
        self.save_button.disabled = False
        self._say(f"{len(samples)} images in {time.perf_counter() - start:.1f} s: reference {ref_id}"
                  + (f" (background removed, mask {self.last_mask_source})" if masks else "")
                  + f", scale {self.scale.value:g}, seed {self.seed.value}, {steps} steps "
                  f"({samples[0].sampler}), guidance {self.guidance.value:g}")
        return samples

    def save(self) -> list[Path]:
        """Save the last results with their settings (helpers.sample.saved.save_samples). Returns the files."""
        if not self.last_samples:
            raise ValueError("nothing to save yet: press Generate first")
        if self.out_dir is None:
            raise ValueError("this panel has no out_dir: create it with SamplingPanel(..., out_dir=folder)")
        self.last_saved = save_samples(self.last_samples, self.out_dir)
        self._say(f"Saved {len(self.last_saved)} images and their settings to {self.out_dir}")
        return self.last_saved

    # ----------------------------------------------------------------------------------------------
    # callbacks: errors go to the status line and last_error (a headless kernel shows no tracebacks)

    def _label(self, ref_id: str) -> str:
        caption = self.captions.get(ref_id, "")
        return f"{caption[:60]}{'...' if len(caption) > 60 else ''} ({ref_id})" if caption else ref_id

    def _step(self) -> None:
        self.progress.value = min(self.progress.max, self.progress.value + 1)

    def _show_settings(self, _change) -> None:
        s = self.settings()
        caption = self.captions.get(s["reference"], "")
        rows = [("reference", f"{s['reference']}" + (f": {caption}" if caption else "")), ("prompt", s["prompt"]),
                ("negative", s["negative_prompt"] or "(none)"),
                *([("concept", _concept_line(self.concept.value, s["prompt"]))] if self._masks else []),
                *([("background", f"removed (mask {self._mask_how(s['reference'])})")]
                  if s["background"] == "removed" and s["reference"] in self.references else []),
                ("IP scale", f"{s['scale']:g}"), ("seed", s["seed"]),
                ("sampler", f"{s['sampler']}, {s['steps']} steps"), ("guidance", f"{s['guidance']:g}"),
                ("models", ", ".join(s["models"]) or "(none ticked)")]
        self.settings_view.value = ("<div class='ipa-settings' style='font-size:12px;line-height:1.35'><b>Next Generate uses</b><br>"
                                    + "<br>".join(f"{k}: {html.escape(str(v))}" for k, v in rows) + "</div>")

    def _say(self, text: str) -> None:
        """Plain text on the status line (escaped: it holds file, model and reference names)."""
        self.status.value = html.escape(text)

    def _report(self, error: Exception) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        self.status.value = f"<span style='color:#b00'>{html.escape(self.last_error)}</span>"

    def _guard(self, action) -> None:
        self.last_error = None
        try:
            action()
        except Exception as e:  # noqa: BLE001  (shown to the user; the panel stays usable)
            self._report(e)

    def _on_generate(self, _button=None) -> None:
        self.generate_button.disabled = True
        try:
            self._guard(self.generate)
        finally:
            self.generate_button.disabled = False

    def _on_save(self, _button=None) -> None:
        self._guard(self.save)

    def _on_upload(self, change) -> None:
        def add():
            for name, image in parse_upload(change["new"] if isinstance(change, dict) else change.new):
                self.add_reference(name, image)
                self._say(f"Uploaded {name} ({image.width} x {image.height})")
        self._guard(add)

    def _on_reference(self, _change) -> None:
        """The preview (and the note under it) for the current reference and mask boxes; an error (e.g. no
        segmenter) goes to the status line, and the preview shows the plain reference."""
        ref_id = self.reference.value
        self.mask_note.value = ""
        if ref_id not in self.references:
            self.preview.value = b""
            return
        self.preview.value = _thumbnail(self.references[ref_id], 128)
        if self.show_mask.value or self.remove_background.value:
            def masked():
                self.preview.value = _thumbnail(self.preview_image(ref_id), 128)
                self.mask_note.value = (f"<small>mask: {html.escape(self.last_mask_source)}; "
                                        f"{self.last_mask.mean():.0%} of the pixels</small>")
            self._guard(masked)

    def _on_words(self, _change) -> None:
        """A typed prompt or concept changes an upload's mask words: show the mask for the new words."""
        if str(self.reference.value).startswith(UPLOAD_PREFIX) and (self.show_mask.value or self.remove_background.value):
            self._on_reference(None)


# ipywidgets 7 (Colab) puts a description into the page as HTML; 8 shows it as plain text
# (jupyter-widgets/ipywidgets#2785). HTML widgets' values are HTML in both.
_HTML_DESCRIPTIONS = int(widgets.__version__.split(".")[0]) < 8


def _description(text: str) -> str:
    """A widget description that shows `text` itself (a user's model name) on ipywidgets 7 and 8 alike."""
    return html.escape(text) if _HTML_DESCRIPTIONS else text


def _concept_line(typed: str, prompt: str) -> str:
    """What the settings box says of the concept: the typed words, or the prompt's subject by the one rule
    (helpers.data.subjects.find_subject), naming its fallback when no words name a subject."""
    if typed.strip():
        return f"{typed.strip()} (typed)"
    words, how = find_subject(prompt)
    return words if how == FOUND else f"{words} ({how}; type one in Concept)"



def _enlarge(image: Image.Image, size: int) -> Image.Image:
    """Small (tiny-profile) images scaled up without blur, so the browser shows pixels, not mush."""
    return image.resize((size, size), Image.NEAREST) if image.width < size else image
