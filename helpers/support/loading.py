"""Loading by Hub id or folder: one wrapper that turns a failed load into a message saying what to do.

Every loader in helpers (base model, IP-Adapter file, image encoder, VAE, evaluation CLIP, DINO, BLIP,
tokenizer, dataset) goes through `loading`, so a wrong or unreachable id never surfaces as huggingface_hub's
bare LocalEntryNotFoundError / RepositoryNotFoundError or an OSError from deep inside a library:

    with loading("base model", base_model):      # any failure -> LoadError: names the id, says what to do
        pipe = StableDiffusionPipeline.from_pretrained(base_model, ...)

    unet, variant = fp16_first(lambda **v: UNet2DConditionModel.from_pretrained(base, subfolder="unet", **v), dtype)
        # fp16: the repo's fp16 weight files (variant="fp16") where it has them, else its default files

The advice depends on what went wrong: a machine that is offline (HF_HUB_OFFLINE=1, or no connection) and
lacks the files in its cache; a repo that does not exist or is private or gated (log in); a repo without
the expected file (check the subfolder); a local folder that does not exist.

A torch pickle (.bin / .pt) is read only with `weights_only=True`; `torch_weights` turns a refusal into our
own message (use a .safetensors file), never torch's advice to retry with weights_only=False, which would
let the file run any code it holds.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .locations import looks_local

T = TypeVar("T")
FP16_VARIANT = "fp16"  # the variant name of SD 1.5's half-precision files (diffusion_pytorch_model.fp16.safetensors)
LOGIN = "log in with `hf auth login` (or set HF_TOKEN; in Colab, the HF_TOKEN secret in the key-icon sidebar)"


class LoadError(OSError):
    """A model, file or dataset could not be loaded. The message names it and says what to do."""


def _chain(error: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):  # pragma: no cover
        return "~/.cache/huggingface/hub"


def explain(what: str, name, error: BaseException) -> str:
    """A message for a failed load of `what` (e.g. "base model") from `name` (Hub id or folder): what went
    wrong and what to do, then the library's own first line."""
    name = str(name)
    errors = _chain(error)
    kinds = {cls.__name__ for e in errors for cls in type(e).__mro__}
    text = " ".join(str(e) for e in errors)
    repo = "/".join(name.strip("/").split("/")[:2])
    missing_file = (f"the repo {repo} exists but lacks the file this needs: check the subfolder and file name "
                    "(and that it is the kind of model asked for)")
    if Path(name).expanduser().exists():
        advice = (f"the local path {name} exists but does not hold a loadable {what} (config and weight files as "
                  "save_pretrained writes them): check that it is the right folder")
    elif looks_local(name):
        advice = "there is no such local file or folder: check the path"
    elif "HFValidationError" in kinds and "OfflineModeIsEnabled" not in kinds:
        advice = "it is neither an existing local folder nor a valid Hub id ('owner/name'): check the spelling"
    elif "GatedRepoError" in kinds:
        advice = (f"the Hub repo {repo} is gated: accept its terms on https://huggingface.co/{repo} and {LOGIN}")
    elif "RepositoryNotFoundError" in kinds:
        advice = (f"no Hub repo {repo!r} is visible to you: check the spelling (owner/name, as on huggingface.co); "
                  f"if the repo is private or gated, {LOGIN} first")
    elif "RevisionNotFoundError" in kinds:
        advice = f"the Hub repo {repo} has no such revision (branch, tag or commit): check it"
    elif "EntryNotFoundError" in kinds and "LocalEntryNotFoundError" not in kinds:  # the Hub answered: no such file
        advice = missing_file
    elif ("OfflineModeIsEnabled" in kinds or "LocalEntryNotFoundError" in kinds or "ConnectionError" in kinds
          or _offline() or "couldn't connect" in text.lower() or "not cached" in text.lower()):
        why = ("this machine is offline (HF_HUB_OFFLINE is set)" if _offline()
               else "huggingface.co could not be reached")
        advice = (f"{why} and {name} is not in the local Hugging Face cache ({_cache_dir()}). Check the spelling; "
                  "if it is right, run once with a network connection (and without HF_HUB_OFFLINE) to download it")
    elif "does not appear to have a file" in text:
        advice = missing_file
    else:
        advice = (f"check the id or path (a Hub id 'owner/name' or a local folder); for a private or gated repo, "
                  f"{LOGIN}")
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"cannot load the {what} {name!r}: {advice}. ({type(error).__name__}: {first[:300]})"


@contextlib.contextmanager
def loading(what: str, name, *, error_type: type[Exception] = LoadError):
    """Within the block, any failure to load `what` from `name` is raised again as `error_type` (LoadError
    by default) with a message from `explain`; the original error is kept as its __cause__."""
    try:
        yield
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001  (filtered just below)
        if not _is_load_failure(e):
            raise  # a missing package, out of memory, a bug: not a matter of the id
        raise error_type(explain(what, name, e)) from e


_HUB_ERRORS = {"EntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError", "OfflineModeIsEnabled",
               "HFValidationError", "DatasetNotFoundError", "HfHubHTTPError"}


def _is_load_failure(error: BaseException) -> bool:
    """OSError / ValueError (what from_pretrained, hf_hub_download and load_dataset raise for a path or id
    they cannot use) or one of huggingface_hub's errors; not ImportError, RuntimeError (e.g. CUDA out of
    memory) or a TypeError from a wrong call."""
    if isinstance(error, ImportError):
        return False
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, (OSError, ValueError)) or bool(names & _HUB_ERRORS)


def fp16_first(load: Callable[..., T], dtype: torch.dtype | None, source=None) -> tuple[T, str]:
    """(`load(variant="fp16")`, "fp16") when dtype is float16 and the repo has fp16 files, else (`load()`, "default").

    SD 1.5's repo ships fp16 copies of its weights (`*.fp16.safetensors`): on a GPU they halve the ~4 GB a
    fresh Colab runtime downloads. A local folder or a community checkpoint without such files loads its
    default files, converted to fp16 by `dtype`. source: the folder or Hub id being loaded; a local folder
    without any `*.fp16.*` file is not tried (the libraries would log the failed attempt). Failures of the
    default load propagate (wrap the call in `loading` for a clear message).
    """
    folder = Path(str(source)).expanduser() if source is not None else None
    if folder is not None and folder.is_dir() and not any(folder.rglob(f"*.{FP16_VARIANT}.*")):
        return load(), "default"
    if dtype == torch.float16:
        try:
            return load(variant=FP16_VARIANT), FP16_VARIANT
        except (OSError, ValueError):
            pass  # no fp16 files (or not reachable): the default files, below, say which
    return load(), "default"


def torch_weights(path, *, error_type: type[Exception] = LoadError, what: str = "weights file"):
    """`torch.load(path, map_location="cpu", weights_only=True)`. A file torch refuses (Python objects beside the
    tensors, or not a torch file at all) raises `error_type` naming the file and saying to use a .safetensors
    file. torch's own text, which advises `weights_only=False`, is not passed on, not even as the cause."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # a missing or unreadable file: its own message names it
    except Exception as e:  # noqa: BLE001  (UnpicklingError, RuntimeError, EOFError...: the same to the user)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        why = (f"it holds Python objects besides tensors ({found.group(1)}), and unpickling those can run any "
               "code the file contains" if found else "it is not a torch weights file (damaged, cut short, or "
               "another format)")
        raise error_type(
            f"{path}: refused to load this {what}: {why}. Use a .safetensors file instead (the official "
            "IP-Adapter Plus weights are published as ip-adapter-plus_sd15.safetensors; notebook 03 saves "
            "adapter.safetensors). Do not load a pickle from a source you cannot trust.") from None
