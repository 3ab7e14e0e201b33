"""Share a trained adapter on the Hugging Face Hub: the upload folder (adapter + model card) and the push.

    folder = build_upload_folder("outputs/runs/text_aware", "outputs/runs/text_aware/hub",
                                 eval_dir="outputs/eval", samples=grid)    # adapter + README.md model card
    push_adapter(folder, "user/name")                # private unless private=False; dry_run=True: the calls only
    pipe = load_pipeline(base, ip_adapter, variant="text_aware", adapter="user/name")   # loads it back by id

    python -m helpers.share RUN_DIR --repo-id user/name [--public] [--dry-run]

Loading by id is helpers.model.adapter_file.resolve_adapter's job. Nothing here uploads unless
`push_adapter` is called without dry_run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.adapter_file import ADAPTER_FILE, AdapterFileError, check_saved_adapter
from ..sample.bank import load_models
from ..sample.gallery import image_grid
from ..sample.generate import GALLERY_PROMPTS, generate
from ..sample.references import held_out_references
from .card import LICENSE, SAMPLES_FILE, make_card
from .public import write_public_adapter
from .run_info import TRADEOFF_FILE, read_evaluation, read_run

CARD_FILE = "README.md"
UPLOAD_FILES = (ADAPTER_FILE, CARD_FILE, SAMPLES_FILE, TRADEOFF_FILE)


# --------------------------------------------------------------------------------------------------
# The upload folder
# --------------------------------------------------------------------------------------------------


def sample_grid(profile, run_dir, data_dir, *, n_references: int = 2, prompts=None, scale: float = 0.6, seed: int = 0):
    """A small grid (PIL image) for the card: held-out references x prompts, the pretrained IP-Adapter Plus
    beside the run's adapter, same seeds. Loads the model bank (helpers.sample.bank) once."""
    run = read_run(run_dir)
    name = f"this adapter ({run.variant})"
    bank = load_models(profile, None, extra={name: str(run_dir)}, verbose=False)
    if name not in bank.models:
        raise AdapterFileError(bank.missing.get(name, f"{run_dir}: not loaded"))
    references, _ = held_out_references(profile, data_dir, n=n_references)
    samples = generate(bank, references, list(prompts or GALLERY_PROMPTS[1:3]), models=["pretrained", name],
                       scales=(scale,), seeds=(seed,), progress=False)
    title = (f"{profile.name} profile{' (RANDOM WEIGHTS: noise)' if profile.random_weights else ''}: IP scale "
             f"{scale:g}, seed {seed}, {profile.num_inference_steps} steps")
    return image_grid(samples, rows=("reference", "prompt"), cols="model", title=title)


def build_upload_folder(run_dir, out_dir, *, eval_dir=None, eval_profile: str | None = None, samples=None,
                        repo_id: str | None = None, license: str = LICENSE) -> Path:
    """Write the folder to upload for one trained run; returns out_dir.

    run_dir:   notebook 03's runs/<variant>/ (adapter.safetensors, config.json, loss_log.csv)
    eval_dir:  notebook 05's eval/ (summary.csv, results.csv, tradeoff.png, headline.txt); its table and plot
               go into the card when they hold this variant's model. eval_profile: the profile 05 ran with
               (its files do not record it); default: the run's own
    samples:   a PIL image or an image file (e.g. sample_grid(...) or notebook 04's gallery.png), or None
    repo_id:   used in the card's loading code (default 'user/repo')
    out_dir gets adapter.safetensors (the run's tensors; its metadata without local paths, helpers.share.public),
    README.md (the model card), and samples.png / tradeoff.png when given. It must be empty or hold only those files (which are replaced).
    """
    from PIL import Image

    run = read_run(run_dir)
    out = Path(out_dir)
    if out.resolve() == run.run_dir.resolve():
        raise ValueError(f"{out}: the upload folder must not be the run folder itself (its checkpoints would be uploaded)")
    if out.is_dir():
        stray = sorted(p.name for p in out.iterdir() if p.name not in UPLOAD_FILES)
        if stray:
            raise ValueError(f"{out}: holds other files ({', '.join(stray[:5])}), which upload_folder would upload too; "
                             "choose an empty folder")
        for name in UPLOAD_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_public_adapter(run.adapter, out / ADAPTER_FILE)  # the same tensors; no local path in its metadata
    evaluation = read_evaluation(eval_dir, run, profile=eval_profile) if eval_dir is not None else None
    if evaluation is not None and evaluation.tradeoff is not None:
        shutil.copyfile(evaluation.tradeoff, out / TRADEOFF_FILE)
    if samples is not None:
        image = samples if isinstance(samples, Image.Image) else Image.open(samples)
        image.convert("RGB").save(out / SAMPLES_FILE)
    card = make_card(run, repo_id=repo_id, evaluation=evaluation, samples=samples is not None, license=license)
    card.save(out / CARD_FILE)
    return out


# --------------------------------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------------------------------


@dataclass
class HubCall:
    """One call to huggingface_hub.HfApi: `getattr(HfApi(token=...), method)(**kwargs)`."""

    method: str
    kwargs: dict
    result: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"HfApi.{self.method}(" + ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()) + ")"


def push_adapter(folder, repo_id: str, *, private: bool = True, token: str | None = None, dry_run: bool = False,
                 commit_message: str | None = None) -> list[HubCall]:
    """Upload an upload folder to a Hub model repo: HfApi.create_repo (exist_ok; a repo that exists keeps its
    visibility) then HfApi.upload_folder. The card is validated by the Hub first, as ModelCard.push_to_hub does.

    dry_run=True: no network; returns the calls it would make. Otherwise returns them with `.result` set
    (upload_folder's CommitInfo; `.result.commit_url`). token: None = the stored login or $HF_TOKEN.
    """
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    validate_repo_id(repo_id)
    if not (folder / CARD_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {CARD_FILE}; build the folder with build_upload_folder first")
    meta = check_saved_adapter(folder / ADAPTER_FILE, str(folder)) if (folder / ADAPTER_FILE).is_file() else None
    if meta is None:
        raise FileNotFoundError(f"{folder}: no {ADAPTER_FILE}; build the folder with build_upload_folder first")
    calls = [
        HubCall("create_repo", {"repo_id": repo_id, "repo_type": "model", "private": private, "exist_ok": True}),
        HubCall("upload_folder", {"repo_id": repo_id, "repo_type": "model", "folder_path": str(folder),
                                  "commit_message": commit_message or f"Upload {meta.get('variant', '')} IP-Adapter"}),
    ]
    if dry_run:
        return calls
    ModelCard.load(folder / CARD_FILE).validate()
    api = HfApi(token=token)
    for call in calls:
        call.result = getattr(api, call.method)(**call.kwargs)
    return calls


def ensure_token() -> str | None:
    """A Hub token for pushing: $HF_TOKEN, a stored login, or Colab's secret HF_TOKEN (the key icon in
    Colab's sidebar). With none, shows huggingface_hub.notebook_login's box and returns None: paste a write
    token there, then run the cell again."""
    from huggingface_hub import get_token, notebook_login

    token = get_token()
    if token is None:
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            token = userdata.get("HF_TOKEN")
        except Exception:  # noqa: BLE001  (not in Colab, no such secret, or access not granted)
            token = None
    if token is None:
        notebook_login()
    return token
