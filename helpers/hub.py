"""Share a trained adapter on the Hugging Face Hub, and load one back by its Hub id.

    folder = build_upload_folder("outputs/runs/text_aware", "outputs/runs/text_aware/hub",
                                 eval_dir="outputs/eval", samples=grid)    # adapter + README.md model card
    push_adapter(folder, "user/name")                # private unless private=False; dry_run=True: the calls only
    pipe = load_pipeline(base, ip_adapter, variant="text_aware", adapter="user/name")   # via resolve_adapter

    python -m helpers.hub RUN_DIR --repo-id user/name [--public] [--dry-run]

`resolve_adapter` is the one place that turns a name into an adapter file. A name is a local file, a local
folder holding adapter.safetensors (notebook 03's run folder, or an upload folder), or a Hub repo id
'user/name' (optionally 'user/name/path/in/repo.safetensors'), fetched with huggingface_hub's
`hf_hub_download`: offline (HF_HUB_OFFLINE=1) that reads the Hub cache, so a folder placed in the cache's
layout loads by id through the very same call. Nothing here uploads unless `push_adapter` is called
without dry_run.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapter_file import AdapterFileError
from .compat import dtype_kwargs
from .model_card import (
    ADAPTER_FILE,
    LICENSE,
    SAMPLES_FILE,
    TRADEOFF_FILE,
    make_card,
    read_evaluation,
    read_run,
)

ADAPTER_FORMAT = "ip-adapter-plus"  # the "format" metadata helpers.adapter.save_adapter writes
CARD_FILE = "README.md"
UPLOAD_FILES = (ADAPTER_FILE, CARD_FILE, SAMPLES_FILE, TRADEOFF_FILE)


# --------------------------------------------------------------------------------------------------
# Loading: a local file, a local folder or a Hub repo id -> one adapter file
# --------------------------------------------------------------------------------------------------


def _hub_spec(text: str) -> tuple[str, str] | None:
    """'user/name' -> ('user/name', 'adapter.safetensors'); 'user/name/sub/x.safetensors' -> ('user/name',
    'sub/x.safetensors'); anything that cannot be a Hub id (absolute, ./, ~, invalid) -> None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not text or text.startswith(("/", ".", "~")) or "\\" in text or ":" in text:
        return None
    parts = text.strip("/").split("/")
    if len(parts) == 2:
        repo, filename = text.strip("/"), ADAPTER_FILE
    elif len(parts) > 2 and parts[-1].endswith(".safetensors"):
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    else:
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo, filename


def check_ours(path: Path, name: str) -> dict[str, str]:
    """Raise AdapterFileError unless `path` is a safetensors file written by save_adapter (metadata
    format=ip-adapter-plus, image_proj.* and ip_adapter.* tensors). `name` is what the user passed (a folder
    or a Hub id), so the message names it. Returns the file's metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, keys = dict(f.metadata() or {}), list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{name}: {path.name} is not a readable safetensors file ({e})") from None
    groups = {k.split(".", 1)[0] for k in keys}
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(
            f"{name}: {path.name} is not an adapter saved by this project (its metadata has no "
            f"format={ADAPTER_FORMAT!r}; {len(keys)} tensors, e.g. {', '.join(sorted(keys)[:3]) or 'none'}). Expected "
            f"the {ADAPTER_FILE} that notebook 03 writes (helpers.adapter.save_adapter). An official IP-Adapter Plus "
            "file is passed as ip_adapter=..., not adapter=...")
    if not {"image_proj", "ip_adapter"} <= groups:
        raise AdapterFileError(f"{name}: {path.name} says format={ADAPTER_FORMAT!r} but holds no image_proj.* and "
                               f"ip_adapter.* tensors (found {sorted(groups)}): the file is damaged; save it again")
    return meta


def resolve_adapter(spec) -> Path:
    """The adapter file named by `spec`, downloaded if it is a Hub id.

    spec: a local file (returned as is: load_pipeline's key checks name any problem in it); a local folder
          holding adapter.safetensors; or a Hub id 'user/name' ('user/name/sub/file.safetensors' for another
          file). Folders and Hub files must have been written by save_adapter (check_ours).
    Raises AdapterFileError naming `spec` and what to do.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        file = path / ADAPTER_FILE
        if not file.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise AdapterFileError(f"{path}: no {ADAPTER_FILE} in this folder (it holds {found}); pass notebook 03's "
                                   "run folder (runs/<variant>/), an upload folder, or the adapter file itself")
        check_ours(file, str(path))
        return file
    hub = _hub_spec(str(spec))
    if hub is None:
        raise AdapterFileError(f"{spec}: no such file or folder (nor a Hub repo id 'user/name')")
    repo, filename = hub
    try:
        local = Path(hf_hub_download(repo, filename))
    except LocalEntryNotFoundError:
        raise AdapterFileError(
            f"{spec}: not a local file or folder, and the Hub repo {repo!r} is not in the local cache with {filename} "
            "while offline (HF_HUB_OFFLINE is set, or the Hub cannot be reached). Check the path, or go online "
            "once to download it") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise AdapterFileError(
            f"{spec}: not a local file or folder, and the Hub repo {repo!r} gave no {filename} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check the repo id; for a private repo log in first "
            "(helpers.hub.ensure_token(), or `hf auth login`)") from None
    check_ours(local, f"Hub repo {repo}")
    return local


def adapter_variant(path) -> str:
    """'text_aware' or 'vanilla', from the file's metadata (or its text_image_attn.* tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta, keys = f.metadata() or {}, list(f.keys())
    return meta.get("variant") or ("text_aware" if any(k.startswith("text_image_attn.") for k in keys) else "vanilla")


def parse_models(text: str) -> dict[str, str]:
    """A notebook form field 'name=spec, spec2' -> {'name': 'spec', '<last part of spec2>': 'spec2'}
    (spec: a Hub id, a run folder or an adapter file, as resolve_adapter takes)."""
    out = {}
    for item in (t.strip() for t in text.replace("\n", ",").split(",")):
        if not item:
            continue
        name, _, spec = item.partition("=") if "=" in item else ("", "", item)
        spec = spec.strip()
        name = name.strip() or Path(spec.rstrip("/")).name.removesuffix(".safetensors")
        if name in out:
            raise ValueError(f"two models named {name!r} in {text!r}: name them, as 'name=user/repo'")
        out[name] = spec
    return out


def load_vae(spec, dtype=None):
    """An AutoencoderKL from a Hub id (e.g. 'stabilityai/sd-vae-ft-mse'), a VAE folder, or a pipeline folder
    (its vae/ subfolder); an AutoencoderKL instance is returned as is."""
    from diffusers import AutoencoderKL

    if isinstance(spec, AutoencoderKL):
        return spec
    from .loading import fp16_first, loading

    sub = "vae" if (Path(spec) / "vae").is_dir() else None
    kwargs = dtype_kwargs(dtype) if dtype is not None else {}
    with loading("VAE (an AutoencoderKL: a Hub id such as stabilityai/sd-vae-ft-mse, or a folder)", spec):
        vae, _ = fp16_first(lambda **v: AutoencoderKL.from_pretrained(str(spec), subfolder=sub, **kwargs, **v), dtype)
    return vae


# --------------------------------------------------------------------------------------------------
# The upload folder
# --------------------------------------------------------------------------------------------------


def sample_grid(profile, run_dir, data_dir, *, n_references: int = 2, prompts=None, scale: float = 0.6, seed: int = 0):
    """A small grid (PIL image) for the card: held-out references x prompts, the pretrained IP-Adapter Plus
    beside the run's adapter, same seeds. Loads the model bank (helpers.sampling) once."""
    from .bank import load_models
    from .figures import image_grid
    from .sampling import GALLERY_PROMPTS, generate, held_out_references

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
    out_dir gets adapter.safetensors (a byte copy of the run's), README.md (the model card), and samples.png /
    tradeoff.png when given. It must be empty or hold only those files (which are replaced).
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
    shutil.copyfile(run.adapter, out / ADAPTER_FILE)
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
    meta = check_ours(folder / ADAPTER_FILE, str(folder)) if (folder / ADAPTER_FILE).is_file() else None
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


def main(argv=None) -> list[HubCall] | None:
    ap = argparse.ArgumentParser(prog="python -m helpers.hub",
                                 description="Build the upload folder of one trained run and push it to the Hub.")
    ap.add_argument("run_dir", help="notebook 03's runs/<variant>/ folder")
    ap.add_argument("--repo-id", help="user/name on the Hub; without it only the folder is built")
    ap.add_argument("--out", help="upload folder (default RUN_DIR/hub)")
    ap.add_argument("--eval-dir", help="notebook 05's eval/ folder (default: <output root>/eval next to runs/, if any)")
    ap.add_argument("--eval-profile", choices=["full", "tiny"], help="the profile notebook 05 ran with (default: the run's)")
    ap.add_argument("--samples", help="an image to show in the card (e.g. notebook 04's samples/gallery.png)")
    ap.add_argument("--public", action="store_true", help="create a public repo (default: private)")
    ap.add_argument("--dry-run", action="store_true", help="build the folder and print the calls; upload nothing")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    eval_dir = Path(args.eval_dir) if args.eval_dir else run_dir.resolve().parent.parent / "eval"
    try:
        folder = build_upload_folder(run_dir, args.out or run_dir / "hub", eval_dir=eval_dir if eval_dir.is_dir() else None,
                                     eval_profile=args.eval_profile, samples=args.samples, repo_id=args.repo_id)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Upload folder: {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    if not args.repo_id:
        print("No --repo-id: nothing pushed.")
        return None
    calls = push_adapter(folder, args.repo_id, private=not args.public, dry_run=args.dry_run)
    for call in calls:
        print(("would call " if args.dry_run else "called ") + str(call))
    if not args.dry_run:
        print(f"Pushed: https://huggingface.co/{args.repo_id}")
    return calls


if __name__ == "__main__":
    main()
