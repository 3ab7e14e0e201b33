"""helpers.share.hub and helpers.share.card: the upload folder and its card, the push (dry run and a fake HfApi), and
loading by Hub id from a Hub-cache layout, on the tiny profile. Nothing touches the network."""
import csv
import errno
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData, constants
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers.evaluate.outputs import ADAPTERS_KEY, write_headline, write_summary, write_tradeoff
from helpers.evaluate.stats import EDIT, OWN
from helpers.model.adapter_file import AdapterFileError, resolve_adapter, save_adapter
from helpers.model.official_format import adapter_state_dict, official_to_live
from helpers.model.pipeline import load_pipeline, load_unet
from helpers.profile import RICK_AND_MORTY
from helpers.sample.bank import load_models
from helpers.sample.registry import adapter_sha256, parse_models
from helpers.share.__main__ import main as hub_main
from helpers.share.card import load_snippet, use_snippet
from helpers.share.hub import HubVisibilityError, build_upload_folder, ensure_token, push_adapter
from helpers.share.run_info import RunInfo, eval_model_name
from helpers.support.disk import DiskFull
from helpers.support.lock import LOCK_FILE, FolderInUse, launch_id, read_lock

REPO = "me/my-adapter"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def run_config(profile, variant, data_dir, name="tiny"):
    """The keys helpers.train writes to config.json (values of a short run)."""
    return {"output_dir": "runs/" + variant, "variant": variant, "profile": name, "data_dir": str(data_dir),
            "batch_size": 4, "epochs": 1, "max_steps": 6, "learning_rate": 1e-4, "weight_decay": 0.01,
            "checkpoint_every": 4, "seed": 0, "mixed_precision": "no", "gradient_checkpointing": False,
            "max_grad_norm": 1.0, "keep_checkpoints": 2, "steps_per_epoch": 3, "train_images": 12,
            "base_model": profile.base_model, "ip_adapter": profile.ip_adapter,
            "drop_rates": {"text": 0.05, "image": 0.05, "both": 0.05}, "num_processes": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def runs(tiny_profile, tmp_path_factory):
    """runs/text_aware and runs/vanilla as notebook 03 leaves them (perturbed weights, config.json, loss_log.csv)."""
    root = tmp_path_factory.mktemp("out")
    pipe = load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, variant="text_aware", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if name.startswith(("encoder_hid_proj.", "text_image_attn.")) or "_ip." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    (root / "data").mkdir()
    (root / "data" / "prepared.json").write_text(json.dumps({"source": tiny_profile.dataset}))
    for variant in ("text_aware", "vanilla"):
        if variant == "vanilla":
            pipe.unet.text_image_attn = None
        config = run_config(tiny_profile, variant, root / "data")
        run = root / "runs" / variant
        save_adapter(pipe, run / "adapter.safetensors", metadata={"base_model": tiny_profile.base_model,
                                                                  "training_config": config})
        (run / "config.json").write_text(json.dumps(config))
        with open(run / "loss_log.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "epoch", "loss", "seconds"])
            w.writerows([s, (s - 1) // 3, 0.5 - 0.01 * s, 0.25] for s in range(1, 7))
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache for this test, used by hf_hub_download exactly as $HF_HUB_CACHE would be."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Copy a folder into the Hub cache's layout (models--user--name/snapshots/<commit>/, refs/main), as a
    download of repo_id would have left it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def check_metadata(data: ModelCardData):
    """What the Hub's validation asks of these fields, offline: Hub ids where ids go, known values elsewhere."""
    for repo_id in ([data.base_model] if data.base_model else []) + list(data.datasets or []):
        validate_repo_id(repo_id)
    assert data.license == "cc-by-nc-sa-4.0" and data.library_name == "diffusers"
    assert data.pipeline_tag == "text-to-image" and all(isinstance(t, str) for t in data.tags)
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()  # round-trips through the dataclass


def test_tiny_card_parses_validates_and_says_random_first(runs, tmp_path):
    grid = Image.new("RGB", (96, 64), "white")
    folder = build_upload_folder(runs / "runs" / "text_aware", tmp_path / "up", samples=grid, repo_id=REPO)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter.safetensors", "samples.png"]
    card = ModelCard.load(folder / "README.md")  # raises on malformed metadata
    check_metadata(card.data)
    assert card.data.base_model is None and card.data.datasets is None  # local tiny models and data: not Hub ids
    assert "text-aware" in card.data.tags and "random-weights" in card.data.tags
    first = card.text.strip().splitlines()[0]
    assert first.startswith("**These weights are random**") and "`tiny` profile" in first
    assert f'adapter="{REPO}"' in card.text and "from helpers.model import load_pipeline" in card.text
    # the one "use it in your own script" text (README and notebook 04 show the same), with the card's placeholders
    assert use_snippet("text_aware", REPO, base_model="./path/to/the/base/model",
                       ip_adapter="./path/to/ip-adapter.safetensors") in card.text
    assert "| steps | 6 (~2.0 epochs) |" in card.text and "0.0 min of training steps (median 0.25 s/step" in card.text
    assert "![Samples" in card.text and "Evaluation" not in card.text
    # a vanilla run on local models: plain diffusers' code, with placeholders that read as local paths
    vanilla = ModelCard.load(build_upload_folder(runs / "runs" / "vanilla", tmp_path / "up_vanilla", repo_id=REPO)
                             / "README.md").text
    assert 'from_pretrained("path/to/image_encoder"' in vanilla and '"path/to", subfolder' not in vanilla
    assert 'StableDiffusionPipeline.from_pretrained("./path/to/the/base/model"' in vanilla


def test_full_run_card_has_hub_metadata_and_notebook_05s_table(runs, tmp_path, tiny_profile):
    import pandas as pd


    run = tmp_path / "runs" / "text_aware"
    shutil.copytree(runs / "runs" / "text_aware", run)
    data = tmp_path / "data"
    data.mkdir()
    (data / "prepared.json").write_text(json.dumps({"source": RICK_AND_MORTY}))
    config = {**run_config(tiny_profile, "text_aware", data, "full"), "base_model": SD15,
              "ip_adapter": "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors"}
    (run / "config.json").write_text(json.dumps(config))
    # notebook 05's files, written by its writers
    eval_dir = tmp_path / "eval"
    rng = np.random.default_rng(0)
    ids = {"pretrained": "0" * 16, "finetuned-text-aware": adapter_sha256(run / "adapter.safetensors")}  # the weights
    rows = [{"model": m, "adapter_sha256": ids[m], "scale": s, "reference": f"r{r}", "prompt": f"{k} of r{r}",
             "seed": 0, "prompt_kind": k, "clip_t": 0.3 - 0.1 * s + rng.normal(0, .01),
             "clip_i": 0.6 + 0.3 * s + rng.normal(0, .01), "dino": 0.5 + 0.3 * s, "clip_model": "openai/clip-vit-large-patch14",
             "clip_i_subject": 0.5 + 0.4 * s + rng.normal(0, .01)}
            for m in ("pretrained", "finetuned-text-aware") for s in (0.5, 1.0) for r in range(4) for k in (OWN, EDIT)]
    eval_dir.mkdir()
    pd.DataFrame(rows).to_csv(eval_dir / "results.csv", index=False)
    summaries = write_summary(rows, eval_dir)
    write_tradeoff(rows, eval_dir)
    write_headline(rows, eval_dir)

    folder = build_upload_folder(run, tmp_path / "up", eval_dir=eval_dir, repo_id=REPO)
    card = ModelCard.load(folder / "README.md")
    check_metadata(card.data)
    assert card.data.base_model == SD15 and card.data.datasets == [RICK_AND_MORTY]
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert card.text.strip().startswith("# Text-aware IP-Adapter Plus")  # no random-weights line
    assert "## Evaluation (notebook 05, `full` profile)" in card.text and "openai/clip-vit-large-patch14" in card.text
    table = [line for line in card.text.splitlines() if line.startswith(("| edit |", "| own caption |"))]
    line = summaries[EDIT].query("model == 'finetuned-text-aware' and scale == 1.0").iloc[0]
    assert len(table) == 4 and f"| edit | 1 | 4 | {line['clip_t']:.3f} [{line['clip_t_lo']:.3f}" in card.text
    assert f"| {line['clip_i_subject']:.3f} [{line['clip_i_subject_lo']:.3f}, {line['clip_i_subject_hi']:.3f}] |" in card.text
    assert (folder / "tradeoff.png").read_bytes() == (eval_dir / "tradeoff.png").read_bytes()
    assert "inherit its terms: non-commercial" in card.text
    # the vanilla run is not in 05's results: no table, no plot
    vanilla = build_upload_folder(runs / "runs" / "vanilla", tmp_path / "up-vanilla", eval_dir=eval_dir)
    assert "Evaluation" not in (vanilla / "README.md").read_text() and not (vanilla / "tradeoff.png").exists()
    assert 'pipe.load_ip_adapter("user/repo", subfolder="", weight_name="adapter.safetensors"' in \
        (vanilla / "README.md").read_text()


def test_folder_adapter_loads_back_equal_to_the_runs(runs, tmp_path, tiny_profile):
    run = runs / "runs" / "text_aware"
    folder = build_upload_folder(run, tmp_path / "up")
    original, copied = load_file(str(run / "adapter.safetensors")), load_file(str(folder / "adapter.safetensors"))
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)
    pipe = load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, variant="text_aware", adapter=folder, device="cpu")
    loaded = adapter_state_dict(pipe.unet)
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
    with pytest.raises(ValueError, match="holds other files"):
        (tmp_path / "up" / "notes.txt").write_text("x")
        build_upload_folder(run, tmp_path / "up")


def full_disk(seen: list, folder: Path):
    """A writer (file path as its second argument) that writes half a file and then finds the disk full; it
    records who holds `folder`'s lock at that moment."""
    def write(_what, path, *args, **kwargs):
        seen.append((Path(path), (read_lock(folder) or {}).get("owner")))
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


@pytest.mark.parametrize("hit", ["README.md", "adapter.safetensors"])
def test_a_full_disk_leaves_the_previous_upload_folder_whole(hit, runs, tmp_path, monkeypatch):
    import safetensors.torch

    run, out = runs / "runs" / "text_aware", tmp_path / "up"
    build_upload_folder(run, out, samples=Image.new("RGB", (32, 32), "white"), repo_id=REPO)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"README.md", "adapter.safetensors", "samples.png"}
    seen = []
    if hit == "README.md":
        monkeypatch.setattr(ModelCard, "save", full_disk(seen, out))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk(seen, out))
    with pytest.raises(DiskFull, match=rf"The disk is full: could not write {out / hit} .*run the same cell or "
                                       r"command again"):
        build_upload_folder(run, out, samples=Image.new("RGB", (32, 32), "black"), repo_id="me/another")
    (written, owner), = seen
    assert written.parent == out and written.name.startswith(f".{hit}.tmp-")  # a temporary, never the file itself
    assert owner == launch_id()  # written under the folder's lock
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # every old file whole; no temporary left


def test_the_upload_folder_has_one_writer_and_copies_only_a_whole_plot(runs, tmp_path):
    run, out, eval_dir = runs / "runs" / "text_aware", tmp_path / "up", tmp_path / "eval"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"owner": "colab-1/pid/7", "pid": 7, "host": "colab-1",
                                             "purpose": "building the upload folder", "since": time.time(),
                                             "seen": time.time()}))
    with pytest.raises(FolderInUse, match=r"up is in use by pid 7 on colab-1 \(building the upload folder\)"):
        build_upload_folder(run, out)
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written beside the other writer
    (out / LOCK_FILE).unlink()
    eval_dir.mkdir()
    from helpers.sample.registry import adapter_sha256

    (eval_dir / "summary.csv").write_text(f"model,scale,adapter_sha256\nfinetuned-text-aware,1.0,"
                                          f"{adapter_sha256(run / 'adapter.safetensors')}\n")
    plot, info = Image.new("RGB", (64, 48), "white"), PngInfo()
    info.add_text(ADAPTERS_KEY, json.dumps({"finetuned-text-aware": adapter_sha256(run / "adapter.safetensors")}))
    plot.save(eval_dir / "tradeoff.png", pnginfo=info)  # as notebook 05 records its adapters
    whole = (eval_dir / "tradeoff.png").read_bytes()
    (eval_dir / "tradeoff.png").write_bytes(whole[: len(whole) // 2])  # as a plain write cut short leaves it
    with pytest.raises(ValueError, match="tradeoff.png: not a whole PNG image .*run notebook 05's plot cell again"):
        build_upload_folder(run, out, eval_dir=eval_dir)
    (eval_dir / "tradeoff.png").write_bytes(whole)
    build_upload_folder(run, out, eval_dir=eval_dir)
    assert (out / "tradeoff.png").read_bytes() == whole and "![Trade-off" in (out / "README.md").read_text()
    build_upload_folder(run, out)  # built again without the evaluation: the old plot does not stay behind
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.safetensors"]


def test_the_card_leaves_out_a_plot_or_headline_of_an_earlier_adapter(runs, tmp_path, capsys):
    """Notebook 05's files record the adapters their rows came from. After a retraining (new adapter bytes) and a
    05 that rewrote its summary but not the plot (or not the headline), the card shows only what is of the
    adapter being shared, and says in one line what it left out and why."""
    import pandas as pd

    run, eval_dir = tmp_path / "runs" / "text_aware", tmp_path / "eval"
    shutil.copytree(runs / "runs" / "text_aware", run)
    rng = np.random.default_rng(1)

    def rows_of(identity):
        return [{"model": m, "adapter_sha256": identity if m == "finetuned-text-aware" else "0" * 16, "scale": s,
                 "reference": f"r{r}", "prompt": f"{k} of r{r}", "seed": 0, "prompt_kind": k,
                 "clip_t": 0.3 - 0.1 * s + rng.normal(0, .01), "clip_i": 0.6 + 0.3 * s + rng.normal(0, .01),
                 "dino": 0.5 + 0.3 * s, "clip_model": "clip"}
                for m in ("pretrained", "finetuned-text-aware") for s in (0.5, 1.0) for r in range(4)
                for k in (OWN, EDIT)]

    def evaluate(rows, *, plot=True):  # notebook 05's cells (all, or all but the plot)
        pd.DataFrame(rows).to_csv(eval_dir / "results.csv", index=False)
        write_summary(rows, eval_dir)
        if plot:
            plt.close(write_tradeoff(rows, eval_dir))
        write_headline(rows, eval_dir)

    def card(name):
        out = build_upload_folder(run, tmp_path / name, eval_dir=eval_dir)
        return (out / "README.md").read_text(), (out / "tradeoff.png").exists(), capsys.readouterr().out

    import matplotlib.pyplot as plt

    eval_dir.mkdir()
    old = adapter_sha256(run / "adapter.safetensors")
    evaluate(rows_of(old))
    old_headline = (eval_dir / "headline.txt").read_bytes()
    text, plot, said = card("unchanged")  # the adapter 05 evaluated: all of it in the card
    assert plot and "![Trade-off" in text and "> RANDOM WEIGHTS" not in text and "> " in text and said == ""
    assert "Adapters used" not in text  # the identities line is for the card's check, not its readers
    tensors = load_file(str(run / "adapter.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0  # retrained: the same file name, other bytes
    with safe_open(str(runs / "runs" / "text_aware" / "adapter.safetensors"), "pt") as f:
        save_file(tensors, str(run / "adapter.safetensors"), metadata=f.metadata())
    new = adapter_sha256(run / "adapter.safetensors")
    assert new != old
    evaluate(rows_of(new), plot=False)  # 05 again, but its plot cell did not run
    text, plot, said = card("retrained")
    assert not plot and "![Trade-off" not in text and "## Evaluation" in text and "\n> " in text
    assert said.count("\n") == 1 and said.startswith("tradeoff.png was made from an earlier adapter: run notebook 05 "
                                                     f"again (it records finetuned-text-aware as {old};")
    evaluate(rows_of(new))
    (eval_dir / "headline.txt").write_bytes(old_headline)  # the plot again, but the headline of before
    text, plot, said = card("retrained-plot")
    assert plot and "![Trade-off" in text and "\n> " not in text
    assert said.startswith("headline.txt was made from an earlier adapter: run notebook 05 again")
    evaluate(rows_of(new))
    assert card("all-again")[1:] == (True, "")


class FakeApi:
    """huggingface_hub.HfApi without a network: `repos` {repo id: private?} are the repos that exist; every
    call is recorded in `made` as (method, kwargs, token)."""

    repos: dict = {}
    made: list = []

    def __init__(self, token=None):
        self.token = token

    def repo_info(self, **kw):
        FakeApi.made.append(("repo_info", kw, self.token))
        if kw["repo_id"] not in FakeApi.repos:
            raise RepositoryNotFoundError("404 Client Error: Repository Not Found",
                                          response=SimpleNamespace(headers={}, request=None))
        return SimpleNamespace(id=kw["repo_id"], private=FakeApi.repos[kw["repo_id"]])

    def __getattr__(self, method):
        return lambda **kw: FakeApi.made.append((method, kw, self.token)) or f"done {method}"


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(ModelCard, "validate", lambda self, repo_type=None: None)
    monkeypatch.setattr(FakeApi, "repos", {})
    monkeypatch.setattr(FakeApi, "made", [])
    return FakeApi


def test_push_dry_run_gives_the_exact_calls_and_a_push_makes_them(runs, tmp_path, fake_hub):
    folder = build_upload_folder(runs / "runs" / "vanilla", tmp_path / "up", repo_id=REPO)
    upload = {"repo_id": REPO, "repo_type": "model", "folder_path": str(folder),
              "allow_patterns": ["adapter.safetensors", "README.md", "samples.png", "tradeoff.png"],
              "commit_message": "Upload vanilla IP-Adapter"}
    calls = push_adapter(folder, REPO, dry_run=True)
    assert [(c.method, c.kwargs) for c in calls] == [
        ("repo_info", {"repo_id": REPO, "repo_type": "model"}),
        ("create_repo", {"repo_id": REPO, "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", upload)]
    assert push_adapter(folder, REPO, private=False, dry_run=True)[1].kwargs["private"] is False
    assert fake_hub.made == []  # a dry run calls nothing
    pushed = push_adapter(folder, REPO, token="hf_x")  # a new repo: created with the visibility asked for
    assert fake_hub.made == [(c.method, c.kwargs, "hf_x") for c in calls]
    assert [c.result for c in pushed] == [None, "done create_repo", "done upload_folder"]
    fake_hub.made.clear()
    fake_hub.repos[REPO] = True  # it exists, private as asked: uploaded to, not created again
    assert [c.method for c in push_adapter(folder, REPO)] == ["repo_info", "upload_folder"]
    assert [m for m, _, _ in fake_hub.made] == ["repo_info", "upload_folder"]
    with pytest.raises(FileNotFoundError, match="no README.md"):
        push_adapter(runs / "runs" / "vanilla", REPO, dry_run=True)  # a run folder is not an upload folder


@pytest.mark.parametrize("exists_private, asked_private", [(False, True), (True, False)])
def test_a_push_to_a_repo_of_the_other_visibility_stops(exists_private, asked_private, runs, tmp_path, fake_hub,
                                                        capsys):
    folder = build_upload_folder(runs / "runs" / "vanilla", tmp_path / "up", repo_id=REPO)
    fake_hub.repos[REPO] = exists_private
    has, asked = ("private", "public") if exists_private else ("public", "private")
    with pytest.raises(HubVisibilityError, match=rf"huggingface.co/{REPO} already exists and is {has}, but a {asked} "
                                                 rf"push was asked for .*Nothing was uploaded.*update_repo_settings"):
        push_adapter(folder, REPO, private=asked_private)
    assert [m for m, _, _ in fake_hub.made] == ["repo_info"]  # neither create_repo nor upload_folder
    argv = [str(runs / "runs" / "vanilla"), "--repo-id", REPO, "--out", str(tmp_path / "up")]
    with pytest.raises(SystemExit, match=f"error: https://huggingface.co/{REPO} already exists and is {has}"):
        hub_main(argv + ([] if asked_private else ["--public"]))
    assert [m for m, _, _ in fake_hub.made] == ["repo_info", "repo_info"]


def test_cli_builds_the_folder_and_dry_runs(runs, tmp_path, capsys):
    calls = hub_main([str(runs / "runs" / "text_aware"), "--repo-id", REPO, "--public", "--dry-run",
                      "--out", str(tmp_path / "up")])
    out = capsys.readouterr().out
    assert [c.method for c in calls] == ["repo_info", "create_repo", "upload_folder"] and calls[1].kwargs["private"] is False
    assert f"would call HfApi.create_repo(repo_id={REPO!r}" in out and (tmp_path / "up" / "README.md").is_file()


def test_loading_by_hub_id_reads_the_hub_cache(runs, tmp_path, tiny_profile, hub_cache, monkeypatch):
    folder = build_upload_folder(runs / "runs" / "text_aware", tmp_path / "up", repo_id=REPO)
    put_in_cache(hub_cache, REPO, folder)
    seen = []
    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **kw: seen.append(a) or real(*a, **kw))
    path = resolve_adapter(REPO)
    assert seen == [(REPO, "adapter.safetensors")] and hub_cache in path.parents
    assert path.read_bytes() == (folder / "adapter.safetensors").read_bytes()
    # the card's own loading code, run as written (on the CPU), loads the same weights by id
    scope = {}
    exec(load_snippet("text_aware", REPO, base_model=tiny_profile.base_model,
                                 ip_adapter=tiny_profile.ip_adapter, device="cpu", dtype="float32"), scope)
    original = load_file(str(runs / "runs" / "text_aware" / "adapter.safetensors"))
    loaded = adapter_state_dict(scope["pipe"].unet)
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
    unet = load_unet(tiny_profile.base_model, tiny_profile.ip_adapter, variant="text_aware", adapter=REPO,
                     image_encoder_dim=scope["pipe"].image_encoder.config.hidden_size, device="cpu")
    assert all(torch.equal(v, original[k]) for k, v in adapter_state_dict(unet).items())


def test_vanilla_upload_loads_by_id_in_plain_diffusers(runs, tmp_path, tiny_profile, hub_cache):
    folder = build_upload_folder(runs / "runs" / "vanilla", tmp_path / "up")
    put_in_cache(hub_cache, REPO, folder)
    scope = {}
    exec(load_snippet("vanilla", REPO, base_model=tiny_profile.base_model,
                                 ip_adapter=tiny_profile.ip_adapter, device="cpu", dtype="float32"), scope)
    assert "helpers" not in load_snippet("vanilla", REPO, base_model=SD15, ip_adapter="h94/IP-Adapter/a/b")
    original = load_file(str(folder / "adapter.safetensors"))
    loaded = adapter_state_dict(scope["pipe"].unet)
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
    assert type(scope["pipe"].scheduler).__name__ == "DDIMScheduler"  # the sampler of the notebooks


def test_foreign_repos_files_and_folders_fail_clearly(tmp_path, tiny_profile, hub_cache):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copyfile(tiny_profile.ip_adapter, foreign / "adapter.safetensors")  # official format, not ours
    put_in_cache(hub_cache, "someone/other-model", foreign)
    with pytest.raises(AdapterFileError, match=r"Hub repo someone/other-model: adapter.safetensors is not an adapter "
                                               r"saved by this project .*format='ip-adapter-plus'"):
        load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, adapter="someone/other-model")
    with pytest.raises(AdapterFileError, match=f"{foreign}: adapter.safetensors is not an adapter saved by this project"):
        resolve_adapter(foreign)
    with pytest.raises(AdapterFileError, match="someone/absent: not a local file or folder, and the Hub repo "
                                               "'someone/absent' is not in the local cache"):
        resolve_adapter("someone/absent")
    with pytest.raises(AdapterFileError, match="no adapter.safetensors in this folder"):
        resolve_adapter(tmp_path / "hub-cache")
    junk = tmp_path / "not-an-adapter.safetensors"
    save_file({"weight": torch.zeros(2)}, str(junk))
    with pytest.raises(AdapterFileError, match="not-an-adapter.safetensors: no image_proj.* or ip_adapter.* tensors"):
        load_pipeline(tiny_profile.base_model, tiny_profile.ip_adapter, adapter=junk)


def test_bank_takes_extra_models_by_hub_id_and_a_vae(runs, tmp_path, tiny_profile, hub_cache):
    from diffusers import AutoencoderKL


    folder = build_upload_folder(runs / "runs" / "text_aware", tmp_path / "up")
    put_in_cache(hub_cache, REPO, folder)
    vae = AutoencoderKL.from_pretrained(tiny_profile.base_model, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)
    vae.save_pretrained(tmp_path / "my-vae")
    bank = load_models(tiny_profile, None, extra={"shared": REPO, "broken": str(tmp_path)},
                                vae=str(tmp_path / "my-vae"), device="cpu", verbose=False)
    assert bank.names == ["pretrained", "shared"] and bank.models["shared"].variant == "text_aware"
    expected = official_to_live(load_file(str(folder / "adapter.safetensors")))
    assert all(torch.equal(bank.models["shared"].params[k], v) for k, v in expected.items())
    assert bank.missing["broken"].startswith(f"cannot use {tmp_path}: ") and "no adapter.safetensors" in bank.missing["broken"]
    assert torch.equal(bank.pipe.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)
    with pytest.raises(ValueError, match="taken by the built-in models"):
        load_models(tiny_profile, None, extra={"pretrained": REPO})


def test_model_names_and_form_fields():
    def run(folder, variant):
        return RunInfo(Path(folder), Path(folder) / "adapter.safetensors", variant, "tiny")

    assert eval_model_name(run("runs/vanilla", "vanilla")) == "finetuned-vanilla"
    assert eval_model_name(run("runs/text_aware", "text_aware")) == "finetuned-text-aware"
    assert eval_model_name(run("runs/text_aware_neighbour", "text_aware")) == "finetuned-text-aware-neighbour"
    assert eval_model_name(run("elsewhere/mine", "text_aware")) == "finetuned-text-aware"  # by its variant
    assert parse_models("mine=me/a, you/b,\n./runs/text_aware/ , x=/tmp/y.safetensors") == {
        "mine": "me/a", "b": "you/b", "text_aware": "./runs/text_aware/", "x": "/tmp/y.safetensors"}
    with pytest.raises(ValueError, match="two models named 'a'"):
        parse_models("me/a, you/a")
    for not_a_file in ("/abs/path", "outputs/runs/text_aware", "me/a/sub/not_weights.txt"):
        with pytest.raises(AdapterFileError, match="no such file or folder"):
            resolve_adapter(not_a_file)  # neither local nor 'user/name[/file.safetensors]': refused before any download


def test_token_comes_from_the_login_else_a_login_box(monkeypatch):
    shown = []
    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda *a, **kw: shown.append(True))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    assert ensure_token() == "hf_stored" and not shown
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert ensure_token() is None and shown == [True]  # outside Colab: no secret, so the login box


class FakeSecrets:
    """kaggle_secrets.UserSecretsClient: `secrets` {name: value}; a missing one raises, as Kaggle's client does."""

    secrets: dict = {}
    asked: list = []

    def get_secret(self, name):
        FakeSecrets.asked.append(name)
        if name not in FakeSecrets.secrets:
            raise RuntimeError("Unexpected response from the service. Response: {'errors': ['No user secrets exist']}")
        return FakeSecrets.secrets[name]


@pytest.mark.parametrize("service", ["kaggle", "colab"])
def test_token_comes_from_the_notebook_services_secrets_before_a_login_box(service, monkeypatch, capsys):
    import sys
    import types

    shown = []
    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda *a, **kw: shown.append(True))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(FakeSecrets, "secrets", {"HF_TOKEN": f"hf_{service}"})
    monkeypatch.setattr(FakeSecrets, "asked", [])
    if service == "kaggle":  # Kaggle's image has kaggle_secrets and no google.colab
        monkeypatch.setitem(sys.modules, "kaggle_secrets", types.SimpleNamespace(UserSecretsClient=FakeSecrets))
        monkeypatch.setitem(sys.modules, "google.colab", None)
    else:
        colab = types.SimpleNamespace(userdata=types.SimpleNamespace(get=FakeSecrets().get_secret))
        monkeypatch.setitem(sys.modules, "google.colab", colab)
        monkeypatch.setitem(sys.modules, "kaggle_secrets", None)
    assert ensure_token() == f"hf_{service}" and FakeSecrets.asked == ["HF_TOKEN"] and not shown
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")  # a login or $HF_TOKEN comes first
    assert ensure_token() == "hf_stored" and FakeSecrets.asked == ["HF_TOKEN"]
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    FakeSecrets.secrets.clear()  # no such secret (or not attached to this notebook): quietly on to the login box
    assert ensure_token() is None and shown == [True] and FakeSecrets.asked == ["HF_TOKEN", "HF_TOKEN"]
    assert capsys.readouterr() == ("", "")


def test_the_card_gives_the_global_batch_and_its_split(tmp_path):
    """Issue 28: config.json's batch_size is the global batch; the card shows it with its split, and an older
    run's (batch_size per process) as it was."""
    from helpers.share.card import _training_table

    def batch_row(config):
        info = RunInfo(tmp_path, tmp_path / "adapter.safetensors", "text_aware", "tiny", config=config)
        return next(line for line in _training_table(info).splitlines() if line.startswith("| batch |"))

    assert batch_row({"batch_size": 4, "global_batch_size": 4, "per_process_batch_size": 2,
                      "num_processes": 2}) == "| batch | 4 (2 per process x 2) |"
    assert batch_row({"batch_size": 4, "num_processes": 2}) == "| batch | 4 x 2 process(es) |"
