"""An ipywidgets panel to compare the models side by side: reference + prompt + settings -> one image per model.

Only ipywidgets, and code that works on both 7.7 (Colab) and 8. The logic is in `SamplingPanel`'s plain
methods (`generate`, `save`, `select`, `add_reference`) and `parse_upload`, which the buttons and observers
call; everything they produce is kept as attributes (`last_samples`, `last_images`, `last_saved`,
`last_error`, `status.value`), because a headless kernel (tests, nbval) never shows widget output.

    panel = SamplingPanel(bank, references, out_dir=env.output_root / "samples" / "panel")
    panel.ui                     # display it (last expression of a cell)
    panel.prompt.value = "..."   # or set the widgets from code,
    panel.generate()             # press the buttons from code, and read
    panel.last_images            # {model name: PIL image}
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import ipywidgets as widgets
from PIL import Image

from . import sample_files, sampling
from .bank import ModelBank
from .images import png_bytes
from .sampling import Sample

UPLOAD_PREFIX = "upload:"


def parse_upload(value) -> list[tuple[str, Image.Image]]:
    """The images in a FileUpload's value, as (file name, RGB PIL image), for both ipywidgets versions:

    ipywidgets 7 (Colab): a dict {file name: {"metadata": {...}, "content": bytes}}
    ipywidgets 8:         a tuple of dicts {"name": ..., "type": ..., "size": ..., "content": memoryview}

    Raises ValueError naming the file when its content is not an image PIL can read.
    """
    if not value:
        return []
    if isinstance(value, dict):  # ipywidgets 7
        items = [(name, entry.get("content", b"") if isinstance(entry, dict) else entry) for name, entry in value.items()]
    elif isinstance(value, (tuple, list)):  # ipywidgets 8
        items = [(entry.get("name") or entry.get("metadata", {}).get("name") or f"upload{i}", entry.get("content", b""))
                 for i, entry in enumerate(value)]
    else:
        raise TypeError(f"unexpected FileUpload value of type {type(value).__name__}")
    out = []
    for name, content in items:
        data = bytes(content)  # memoryview (8) or bytes (7)
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001  (PIL raises several types for unreadable data)
            raise ValueError(f"uploaded file {name!r} ({len(data)} bytes) is not an image PIL can read ({e})") from None
        out.append((name, image))
    return out


def _thumbnail(image: Image.Image, size: int) -> bytes:
    im = image.convert("RGB").copy()
    if im.width < size:  # tiny profile: 64 px drawings, shown larger without blur
        im = im.resize((size, size), Image.NEAREST)
    im.thumbnail((size, size))
    return png_bytes(im)


class SamplingPanel:
    """The interactive comparison panel (see the module docstring). Widgets are public attributes:
    reference (Dropdown), upload (FileUpload), prompt, negative_prompt, scale, seed, steps, guidance,
    model_boxes ({name: Checkbox}), generate_button, save_button, progress, status; `ui` holds them all.
    """

    def __init__(self, bank: ModelBank, references: dict[str, Image.Image] | None = None, *, out_dir=None,
                 prompt: str = sampling.GALLERY_PROMPTS[1], thumbnails: int = 8, thumb_size: int = 96,
                 image_size: int = 256):
        self.bank = bank
        self.references = {str(k): v.convert("RGB") for k, v in (references or {}).items()}
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.image_size = image_size
        self.last_samples: list[Sample] = []
        self.last_images: dict[str, Image.Image] = {}
        self.last_saved: list[Path] = []
        self.last_error: str | None = None
        profile = bank.profile
        W = widgets

        # reference: a dropdown (the state), thumbnails with a button each, an upload button, a preview
        self.reference = W.Dropdown(options=list(self.references), description="Reference",
                                    value=next(iter(self.references), None))
        self.preview = W.Image(value=b"", format="png", width="128")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="Upload")
        thumbs = []
        for ref_id in list(self.references)[:thumbnails]:
            button = W.Button(description=ref_id, layout=W.Layout(width=f"{thumb_size}px"))
            button.on_click(lambda _b, ref_id=ref_id: self.select(ref_id))
            thumbs.append(W.VBox([W.Image(value=_thumbnail(self.references[ref_id], thumb_size), format="png",
                                          width=str(thumb_size)), button]))
        self.thumbnails = W.HBox(thumbs, layout=W.Layout(flex_flow="row wrap"))
        self.reference.observe(self._on_reference, names="value")
        self.upload.observe(self._on_upload, names="value")

        # settings
        wide = W.Layout(width="95%")
        self.prompt = W.Text(value=prompt, description="Prompt", layout=wide)
        self.negative_prompt = W.Text(value="", description="Negative", layout=wide)
        self.scale = W.FloatSlider(value=1.0, min=0.0, max=1.5, step=0.05, description="IP scale")
        self.seed = W.IntText(value=0, description="Seed")
        self.steps = W.IntSlider(value=profile.num_inference_steps, min=1, max=100, description="Steps")
        self.guidance = W.FloatSlider(value=profile.guidance_scale, min=1.0, max=15.0, step=0.5, description="Guidance")
        self.model_boxes = {name: W.Checkbox(value=True, description=name, indent=False) for name in bank.names}

        # actions and results
        self.generate_button = W.Button(description="Generate", button_style="primary", icon="play")
        self.save_button = W.Button(description="Save", icon="save", disabled=True)
        self.generate_button.on_click(self._on_generate)
        self.save_button.on_click(self._on_save)
        self.progress = W.IntProgress(value=0, min=0, max=max(1, len(bank.names)), description="Progress")
        self.status = W.HTML(value="")
        self.result_labels = {name: W.HTML(value=f"<b>{name}</b>") for name in bank.names}
        self.result_images = {name: W.Image(value=b"", format="png", width=str(image_size)) for name in bank.names}
        results = W.HBox([W.VBox([self.result_labels[n], self.result_images[n]]) for n in bank.names])

        notes = []
        if profile.random_weights:
            notes.append(f"Profile {profile.name}: random weights, the pictures are noise.")
        notes += [f"{name} is not available: {msg}" for name, msg in bank.missing.items()]
        self.notes = W.HTML(value="<br>".join(f"<i>{n}</i>" for n in notes))
        self.ui = W.VBox([
            self.notes,
            W.HBox([W.VBox([self.reference, self.upload]), self.preview]),
            self.thumbnails,
            self.prompt, self.negative_prompt,
            W.HBox([self.scale, self.seed]), W.HBox([self.steps, self.guidance]),
            W.HBox(list(self.model_boxes.values())),
            W.HBox([self.generate_button, self.save_button, self.progress]),
            self.status,
            results,
        ])
        self._on_reference(None)

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
        options = list(self.reference.options)
        if ref_id not in options:
            self.reference.options = options + [ref_id]
        self.reference.value = ref_id
        self._on_reference(None)  # the value may not have changed (same name uploaded again)
        return ref_id

    def generate(self) -> list[Sample]:
        """One image per ticked model with the current settings, shown as each model finishes.
        Returns the samples (also kept in last_samples / last_images)."""
        ref_id = self.reference.value
        if ref_id is None:
            raise ValueError("no reference image: pick a test image or upload one")
        models = [name for name, box in self.model_boxes.items() if box.value]
        if not models:
            raise ValueError("no model ticked: tick at least one")
        self.progress.max, self.progress.value = len(models), 0
        for name in self.bank.names:
            self.result_labels[name].value = f"<b>{name}</b>: " + ("waiting..." if name in models else "not ticked")
        samples, start = [], time.perf_counter()
        for i, name in enumerate(models):
            self.status.value = f"Generating with {name} ({i + 1}/{len(models)})..."
            t = time.perf_counter()
            sample, = sampling.generate(
                self.bank, {ref_id: self.references[ref_id]}, [self.prompt.value], models=[name],
                scales=(self.scale.value,), seeds=(int(self.seed.value),), steps=int(self.steps.value),
                guidance=float(self.guidance.value), negative_prompt=self.negative_prompt.value, progress=False)
            samples.append(sample)
            self.result_images[name].value = png_bytes(_enlarge(sample.image, self.image_size))
            self.result_labels[name].value = f"<b>{name}</b> ({time.perf_counter() - t:.1f} s)"
            self.progress.value = i + 1
        self.last_samples = samples
        self.last_images = {s.model: s.image for s in samples}
        self.save_button.disabled = False
        self.status.value = (f"{len(samples)} images in {time.perf_counter() - start:.1f} s: reference {ref_id}, "
                             f"scale {self.scale.value:g}, seed {self.seed.value}, {self.steps.value} steps, "
                             f"guidance {self.guidance.value:g}")
        return samples

    def save(self) -> list[Path]:
        """Save the last results with their settings (helpers.sample_files.save_samples). Returns the files."""
        if not self.last_samples:
            raise ValueError("nothing to save yet: press Generate first")
        if self.out_dir is None:
            raise ValueError("this panel has no out_dir: create it with SamplingPanel(..., out_dir=folder)")
        self.last_saved = sample_files.save_samples(self.last_samples, self.out_dir)
        self.status.value = f"Saved {len(self.last_saved)} images and their settings to {self.out_dir}"
        return self.last_saved

    # ----------------------------------------------------------------------------------------------
    # callbacks: errors go to the status line and last_error (a headless kernel shows no tracebacks)

    def _report(self, error: Exception) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        self.status.value = f"<span style='color:#b00'>{self.last_error}</span>"

    def _on_generate(self, _button=None) -> None:
        self.last_error = None
        self.generate_button.disabled = True
        try:
            self.generate()
        except Exception as e:  # noqa: BLE001  (shown to the user; the panel stays usable)
            self._report(e)
        finally:
            self.generate_button.disabled = False

    def _on_save(self, _button=None) -> None:
        self.last_error = None
        try:
            self.save()
        except Exception as e:  # noqa: BLE001
            self._report(e)

    def _on_upload(self, change) -> None:
        self.last_error = None
        try:
            for name, image in parse_upload(change["new"] if isinstance(change, dict) else change.new):
                self.add_reference(name, image)
                self.status.value = f"Uploaded {name} ({image.width} x {image.height})"
        except Exception as e:  # noqa: BLE001
            self._report(e)

    def _on_reference(self, _change) -> None:
        ref_id = self.reference.value
        self.preview.value = _thumbnail(self.references[ref_id], 128) if ref_id in self.references else b""


def _enlarge(image: Image.Image, size: int) -> Image.Image:
    """Small (tiny-profile) images scaled up without blur, so the browser shows pixels, not mush."""
    return image.resize((size, size), Image.NEAREST) if image.width < size else image
