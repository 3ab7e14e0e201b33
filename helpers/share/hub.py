"""Share a trained adapter on the Hugging Face Hub: the upload folder (adapter + model card) and the push.

    folder = build_upload_folder("outputs/runs/text_aware", "outputs/runs/text_aware/hub",
                                 eval_dir="outputs/eval", samples=grid)    # adapter + README.md model card
    push_adapter(folder, "user/name")                # private unless private=False; dry_run=True: the calls only
    pipe = load_pipeline(base, ip_adapter, variant="text_aware", adapter="user/name")   # loads it back by id

    python -m helpers.share RUN_DIR --repo-id user/name [--public] [--dry-run]

Loading by id is helpers.model.adapter_file.resolve_adapter's job. Nothing here uploads unless
`push_adapter` is called without dry_run.

Faults: the upload folder has one writer at a time (helpers.support.lock.FolderLock, held while it is built
and while it is pushed; during the push a thread beats the lock (FolderLock.beating), as the upload is one blocking
call that can outlast the lock's stale age). Its files are written all or none: each goes to a temporary beside it
(helpers.support.atomic), and they replace the old ones only once every one is complete, so a disconnect or a
full disk (DiskFull naming the file) leaves the previous build whole. A push never changes a repo's
visibility: an existing repo that is public while private was asked for (or the reverse) stops the push.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..evaluate.outputs import recorded_adapters
from ..model.adapter_file import ADAPTER_FILE, AdapterFileError, check_saved_adapter
from ..sample.bank import load_models
from ..sample.gallery import image_grid
from ..sample.generate import GALLERY_PROMPTS, generate
from ..sample.references import held_out_references
from ..support.atomic import replacing
from ..support.disk import disk_errors
from ..support.lock import LOCK_FILE, FolderLock
from .card import LICENSE, SAMPLES_FILE, make_card
from .public import public_adapter
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
    README.md (the model card), and samples.png / tradeoff.png when given. It must be empty or hold only those
    files (which are replaced). Built under the folder's lock; all files or none (see the module docstring).
    """
    from PIL import Image
    from safetensors.torch import save_file

    run = read_run(run_dir)
    out = Path(out_dir)
    if out.resolve() == run.run_dir.resolve():
        raise ValueError(f"{out}: the upload folder must not be the run folder itself (its checkpoints would be uploaded)")
    evaluation = read_evaluation(eval_dir, run, profile=eval_profile) if eval_dir is not None else None
    tradeoff = _whole_png(evaluation) if evaluation is not None and evaluation.tradeoff is not None else None
    image = None if samples is None else samples if isinstance(samples, Image.Image) else Image.open(samples)
    card = make_card(run, repo_id=repo_id, evaluation=evaluation, samples=samples is not None, license=license)
    tensors, metadata = public_adapter(run.adapter)  # the same tensors; no local path in its metadata

    with FolderLock(out, "building the upload folder"):  # also removes temporaries of an interrupted build
        stray = sorted(p.name for p in out.iterdir() if p.name not in UPLOAD_FILES and p.name != LOCK_FILE)
        if stray:
            raise ValueError(f"{out}: holds other files ({', '.join(stray[:5])}), which upload_folder would upload too; "
                             "choose an empty folder")
        written = []
        with contextlib.ExitStack() as stack:  # every file to a temporary; all replace the old ones at the end

            def write(name, writer):
                with disk_errors(out / name):  # a full disk is named with the file it hit
                    writer(stack.enter_context(replacing(out / name)))
                written.append(name)

            write(ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
            if tradeoff is not None:
                write(TRADEOFF_FILE, lambda tmp: tmp.write_bytes(tradeoff))
            if image is not None:
                write(SAMPLES_FILE, lambda tmp: image.convert("RGB").save(tmp, format="PNG"))
            write(CARD_FILE, card.save)
        for name in set(UPLOAD_FILES) - set(written):  # left by an earlier build that had them
            (out / name).unlink(missing_ok=True)
    return out


def _whole_png(evaluation) -> bytes:
    """The bytes of notebook 05's plot (evaluation.tradeoff), read once, checked to be a whole PNG (never a
    half-written one) and to record evaluation's adapter (read_evaluation checked the file; a new plot may have
    replaced it since)."""
    from PIL import Image

    path = evaluation.tradeoff
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes every row: a cut file raises here
    except Exception as e:  # noqa: BLE001  (PIL raises several types for a damaged file)
        raise ValueError(f"{path}: not a whole PNG image ({e}); run notebook 05's plot cell again (or pass "
                         "eval_dir=None to leave the evaluation out of the card)") from None
    if (recorded_adapters(data) or {}).get(evaluation.model) != evaluation.adapter_sha256:
        raise ValueError(f"{path}: replaced while the upload folder was built (it no longer records {evaluation.model}"
                         f" as {evaluation.adapter_sha256}); build the folder again")
    return data


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


class HubPushError(RuntimeError):
    """The Hub refused a call of the push; the message names the repo, the call and what to check."""


class HubVisibilityError(ValueError):
    """The repo exists with another visibility than the one asked for; nothing was pushed."""


def push_adapter(folder, repo_id: str, *, private: bool = True, token: str | None = None, dry_run: bool = False,
                 commit_message: str | None = None) -> list[HubCall]:
    """Upload an upload folder to a Hub model repo: HfApi.repo_info, HfApi.create_repo (only when the repo does
    not exist yet, with the visibility asked for), then HfApi.upload_folder (only UPLOAD_FILES). The card is
    validated by the Hub first, as ModelCard.push_to_hub does.

    An existing repo keeps its visibility on the Hub whatever create_repo is told, so a repo whose visibility
    differs from `private` stops the push with HubVisibilityError (nothing uploaded) saying how to go on.
    dry_run=True: no network; returns the calls it would make (create_repo is made only for a new repo).
    Otherwise returns the calls made, with `.result` set (repo_info's ModelInfo, or None for a new repo;
    upload_folder's CommitInfo: `.result.commit_url`). token: None = the stored login or $HF_TOKEN.
    """
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    validate_repo_id(repo_id)
    if not (folder / CARD_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {CARD_FILE}; build the folder with build_upload_folder first")
    meta = check_saved_adapter(folder / ADAPTER_FILE, str(folder)) if (folder / ADAPTER_FILE).is_file() else None
    if meta is None:
        raise FileNotFoundError(f"{folder}: no {ADAPTER_FILE}; build the folder with build_upload_folder first")
    info, create, upload = (
        HubCall("repo_info", {"repo_id": repo_id, "repo_type": "model"}),
        HubCall("create_repo", {"repo_id": repo_id, "repo_type": "model", "private": private, "exist_ok": True}),
        HubCall("upload_folder", {"repo_id": repo_id, "repo_type": "model", "folder_path": str(folder),
                                  "allow_patterns": list(UPLOAD_FILES),  # never the lock or a temporary
                                  "commit_message": commit_message or f"Upload {meta.get('variant', '')} IP-Adapter"}))
    if dry_run:
        return [info, create, upload]
    ModelCard.load(folder / CARD_FILE).validate()
    api = HfApi(token=token)
    # no build replaces the files while they upload; a thread beats the lock through the upload's one long call
    with FolderLock(folder, "pushing to the Hub") as lock, lock.beating():
        try:
            info.result = api.repo_info(**info.kwargs)
        except RepositoryNotFoundError:
            info.result = None  # a new repo (or one this token cannot see: create_repo then says so)
        calls = [info]
        if info.result is None:
            calls.append(create)
        else:
            _check_visibility(repo_id, getattr(info.result, "private", None), private)
        calls.append(upload)
        for call in calls[1:]:
            try:
                call.result = getattr(api, call.method)(**call.kwargs)
            except HfHubHTTPError as e:
                raise HubPushError(
                    f"{repo_id}: the Hub refused {call} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                    "Check the repo id (your user name or an organisation you can write to) and that the token "
                    "is a write token (huggingface.co/settings/tokens).") from e
    return calls


def _check_visibility(repo_id: str, is_private: bool | None, private: bool) -> None:
    """Raise HubVisibilityError when an existing repo's visibility is not the one asked for."""
    if is_private is None or bool(is_private) == private:
        return
    has, asked = ("public", "private") if private else ("private", "public")
    raise HubVisibilityError(
        f"https://huggingface.co/{repo_id} already exists and is {has}, but a {asked} push was asked for "
        f"({'PRIVATE ticked, private=True' if private else 'PRIVATE unticked, private=False or --public'}). Pushing "
        f"would leave it {has}: the Hub never changes an existing repo's visibility on upload. Nothing was uploaded. "
        f"To go on, either make it {asked} first (on https://huggingface.co/{repo_id}/settings, or "
        f"HfApi().update_repo_settings({repo_id!r}, private={private})), then push again; or push it as it is "
        f"({'private=False, --public' if private else 'private=True, without --public'}); or choose another repo id.")


def ensure_token() -> str | None:
    """A Hub token for pushing: $HF_TOKEN or a stored login; else the secret HF_TOKEN of Colab (the key icon in
    Colab's sidebar) or of Kaggle (Add-ons > Secrets, attached to this notebook). With none, shows
    huggingface_hub.notebook_login's box and returns None: paste a write token there, then run the cell again."""
    from huggingface_hub import get_token, notebook_login

    token = get_token() or _notebook_secret("HF_TOKEN")
    if token is None:
        notebook_login()
    return token


def _colab_secret(name: str):
    from google.colab import userdata  # type: ignore[import-not-found]  (only in Colab)

    return userdata.get(name)


def _kaggle_secret(name: str):
    from kaggle_secrets import UserSecretsClient  # type: ignore[import-not-found]  (only on Kaggle)

    return UserSecretsClient().get_secret(name)


def _notebook_secret(name: str) -> str | None:
    """The secret `name` from Colab's or Kaggle's secrets, whichever this notebook runs in and holds it; None
    otherwise, quietly."""
    for read in (_colab_secret, _kaggle_secret):
        try:
            token = read(name)
        except Exception:  # noqa: BLE001  (not that service, no such secret, or no access: each its own error)
            continue
        if token:
            return token
    return None
