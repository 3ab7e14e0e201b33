"""The model card of one trained adapter: what notebook 03's run folder says about it, as a Hub README.md.

    run = read_run("outputs/runs/text_aware")      # config.json, loss_log.csv, the adapter's metadata
    card = make_card(run, repo_id="user/name", evaluation=read_evaluation("outputs/eval", run))
    card.save("README.md")                          # a huggingface_hub.ModelCard: YAML metadata + Markdown

The metadata (`ModelCardData`) is what the Hub indexes: base model, licence, library, tags, datasets. Only
Hub ids go there; a run on local models or data (the `tiny` profile, a user's own images) names them in the
body instead. A `tiny` run's card says in its first line that the weights are random.
"""

from __future__ import annotations

import json

from ..model.adapter_file import ADAPTER_FILE
from ..profile import IP_ADAPTER_PLUS, RICK_AND_MORTY, SD15, full_profile
from ..support.env import REPO, install_command
from ..support.locations import image_encoder_next_to, is_hub_id
from .public import public_name
from .run_info import TRADEOFF_FILE, Evaluation, RunInfo

LICENSE = "cc-by-nc-sa-4.0"  # the Rick and Morty drawings' licence, which weights fitted to them inherit
SAMPLES_FILE = "samples.png"


# --------------------------------------------------------------------------------------------------
# Notebook 05's results for this model
# --------------------------------------------------------------------------------------------------


def _interval(row: dict, metric: str) -> str:
    """'mean [low, high]', or '-' where the summary has no such score (an older summary.csv, or no mask)."""
    try:
        mean, lo, hi = (float(row[metric + end]) for end in ("", "_lo", "_hi"))
    except (KeyError, ValueError):
        return "-"
    return "-" if mean != mean else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def evaluation_markdown(ev: Evaluation, *, with_plot: bool) -> str:
    random = ev.profile == "tiny"
    lines = [f"## Evaluation (notebook 05, `{ev.profile}` profile)", ""]
    if random:
        lines += ["**Random weights (tiny profile): these numbers are meaningless; they only show that the code runs.**", ""]
    lines += [f"Plain cosines, mean and 95% t interval over held-out references; CLIP model "
              f"`{ev.clip_model or 'not recorded'}`. CLIP-T: image vs prompt; CLIP-I and DINO: image vs reference; "
              "CLIP-I subject: the character alone (each background filled white) vs the reference's. "
              f"Model `{ev.model}`.", "",
              "| prompts | IP scale | references | CLIP-T | CLIP-I | DINO | CLIP-I subject |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in ev.rows:
        lines.append(f"| {r.get('prompt_kind', 'all')} | {float(r['scale']):g} | {r.get('n_references', '')} | "
                     f"{_interval(r, 'clip_t')} | {_interval(r, 'clip_i')} | {_interval(r, 'dino')} | "
                     f"{_interval(r, 'clip_i_subject')} |")
    if ev.headline:
        lines += ["", "> " + ev.headline.replace("\n", "\n> ")]
    if with_plot:
        lines += ["", f"![Trade-off: CLIP-I, DINO and subject CLIP-I against CLIP-T across IP-Adapter scales "
                      f"({ev.profile} profile)]"
                      f"({TRADEOFF_FILE})", "",
                  f"The trade-off plot of notebook 05 ({ev.profile} profile): up and to the right is better; one "
                  "curve per model across IP-Adapter scales."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# How to load it
# --------------------------------------------------------------------------------------------------


def _loading(variant: str, adapter: str, *, base_model: str, ip_adapter: str, device: str, dtype: str,
             vae: str | None) -> tuple[list[str], str]:
    """(import lines, code) that load the adapter into a StableDiffusionPipeline named `pipe`."""
    q = json.dumps  # a Python string literal in double quotes
    if variant == "text_aware":
        vae_line = f"    vae={q(vae)},  # another VAE\n" if vae else ""
        return (["import torch", f"from helpers.model import load_pipeline  # {install_command().replace(' -q', '')}"],
                "pipe = load_pipeline(\n"
                f"    {q(base_model)},  # base: any SD 1.5 checkpoint (vae=... for another VAE)\n"
                f"    {q(ip_adapter)},  # where its image encoder comes from\n"
                "    variant=\"text_aware\",\n"
                f"    adapter={q(adapter)},  # a run folder, its adapter.safetensors, or a Hub id \"you/name\"\n"
                f"{vae_line}    device={q(device)}, dtype=torch.{dtype})\n")
    if vae:
        raise ValueError(f"vae={vae!r}: only the text-aware snippet (load_pipeline) takes another VAE")
    repo, sub = image_encoder_next_to(ip_adapter)
    encoder = f"{q(repo)}, subfolder={q(sub)}" if sub else q(repo)
    return (["import torch", "from diffusers import DDIMScheduler, StableDiffusionPipeline",
             "from transformers import CLIPVisionModelWithProjection"],
            f"image_encoder = CLIPVisionModelWithProjection.from_pretrained({encoder}, torch_dtype=torch.{dtype})\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({q(base_model)}, image_encoder=image_encoder,\n"
            f"                                               torch_dtype=torch.{dtype}).to({q(device)})\n"
            f"pipe.load_ip_adapter({q(adapter)}, subfolder=\"\", weight_name={q(ADAPTER_FILE)}, "
            "image_encoder_folder=None)\n"
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the sampler it was evaluated with\n")


def load_snippet(variant: str, adapter: str, *, base_model: str, ip_adapter: str, device: str = "cuda",
                 dtype: str = "float16", vae: str | None = None) -> str:
    """Python that loads the adapter (a Hub repo id or a local folder) into a StableDiffusionPipeline named
    `pipe`. Vanilla: plain diffusers. Text-aware: helpers.model.pipeline.load_pipeline (the block is ours),
    which alone takes `vae` (another AutoencoderKL)."""
    imports, code = _loading(variant, adapter, base_model=base_model, ip_adapter=ip_adapter, device=device,
                             dtype=dtype, vae=vae)
    return "\n".join(imports) + "\n\n" + code


USE_PROMPT = "a cartoon character on a beach at sunset"
README_ADAPTER = "outputs/runs/text_aware"  # README's block: use_snippet("text_aware", README_ADAPTER)
_FULL = full_profile("the sampling settings a script starts from")  # SD 1.5's: 512 px, 30 DDIM steps, guidance 7.5


def use_snippet(variant: str, adapter: str, *, base_model: str = SD15, ip_adapter: str = IP_ADAPTER_PLUS,
                vae: str | None = None, device: str = "cuda", dtype: str = "float16",
                reference: str = "reference.png", prompt: str = USE_PROMPT, scale: float = 0.6,
                steps: int | None = None, guidance: float | None = None, resolution: int | None = None,
                seed: int = 0, out: str = "out.png") -> str:
    """The "use it in your own script" text, one for README (`readme_snippet()`), the model card and notebook
    04: a whole Python script that loads the adapter (load_snippet) and draws one picture of `reference` (an
    image file) with `prompt` at IP-Adapter scale `scale`, saved to `out`. steps, guidance, resolution: the
    full profile's (30, 7.5, 512) where not given."""
    q = json.dumps
    imports, code = _loading(variant, adapter, base_model=base_model, ip_adapter=ip_adapter, device=device,
                             dtype=dtype, vae=vae)
    size = resolution or _FULL.resolution
    imports = imports[:1] + sorted(imports[1:] + ["from diffusers.utils import load_image"])
    return ("\n".join(imports) + "\n\n" + code + "\n"
            f"pipe.set_ip_adapter_scale({scale:g})  # 0: prompt only ... 1: follow the reference closely\n"
            f"image = pipe({q(prompt)}, ip_adapter_image=load_image({q(reference)}),\n"
            f"             num_inference_steps={steps or _FULL.num_inference_steps}, "
            f"guidance_scale={_FULL.guidance_scale if guidance is None else guidance:g}, height={size}, width={size},\n"
            f"             generator=torch.Generator().manual_seed({seed})).images[0]  # CPU noise: the same on any device\n"
            f"image.save({q(out)})\n")


def readme_snippet() -> str:
    """README's "Use a trained adapter in your own script" block, word for word (tests/share/test_card.py)."""
    return use_snippet("text_aware", README_ADAPTER)


# --------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------


CARD_INTRO = {
    "text_aware": (
        "**Text-aware IP-Adapter Plus** for Stable Diffusion 1.5. IP-Adapter Plus turns a reference image into 16 "
        "image tokens (a perceiver Resampler over the CLIP ViT-H/14 image encoder's patch features) that every "
        "cross-attention layer of the UNet reads beside the prompt. This adapter adds one block in front of that: "
        "the 16 image tokens attend to the prompt's 77 text-encoder states (multi-head, pre-norm, residual, output "
        "projection initialised at zero, so training starts from exactly the pretrained adapter). The prompt can "
        "then choose what of the reference reaches the picture. The block's weights are the `text_image_attn.*` "
        "tensors of `adapter.safetensors`; plain diffusers does not know them, so load it with this project's "
        "helpers (below)."),
    "vanilla": (
        "**IP-Adapter Plus** for Stable Diffusion 1.5, fine-tuned as published (diffusers' own IP-Adapter path, no "
        "new layers): the baseline that the text-aware adapter is compared with. `adapter.safetensors` is in the "
        "official IP-Adapter format, so it loads in plain diffusers."),
}


def card_data(run: RunInfo, *, license: str = LICENSE):
    """The card's metadata (huggingface_hub.ModelCardData); local paths never go into it."""
    from huggingface_hub import ModelCardData

    base = run.base_model if is_hub_id(run.base_model) else None
    tags = ["ip-adapter", "ip-adapter-plus", "stable-diffusion", "stable-diffusion-diffusers", "text-to-image",
            "text-aware-ip-adapter"] + (["text-aware"] if run.variant == "text_aware" else [])
    if run.random_weights:
        tags.append("random-weights")
    data = run.data_source if run.data_source and is_hub_id(run.data_source) else None
    extra = {"base_model_relation": "adapter"} if base else {}
    return ModelCardData(base_model=base, license=license, library_name="diffusers", pipeline_tag="text-to-image",
                         tags=tags, datasets=[data] if data else None, **extra)


PRECISION = {"no": "fp32", "fp16": "fp16 mixed precision (fp32 adapter weights)",
             "bf16": "bf16 mixed precision (fp32 adapter weights)"}


def _training_table(run: RunInfo) -> str:
    c = run.config
    epochs = (f"{run.steps / c['steps_per_epoch']:.1f}" if run.steps and c.get("steps_per_epoch") else
              str(c.get("epochs") or "-"))
    rows = [
        ("profile", f"`{run.profile}`" + (" (random weights)" if run.random_weights else "")),
        ("base model", f"`{public_name(run.base_model) or 'not recorded'}`"),
        ("started from", f"`{public_name(run.ip_adapter) or 'not recorded'}`" + (" (new block at zero)" if run.variant == "text_aware" else "")),
        ("data", f"`{public_name(run.data_source) or 'not recorded'}`, {c.get('train_images', '?')} training images"),
        ("steps", f"{run.steps if run.steps is not None else c.get('max_steps', '?')} (~{epochs} epochs)"),
        ("batch", f"{c['global_batch_size']} ({c['per_process_batch_size']} per process x {c['num_processes']})"
                  if "global_batch_size" in c else  # older runs: batch_size was per process
                  f"{c.get('batch_size', '?')} x {c.get('num_processes', 1)} process(es)"),
        ("optimizer", f"AdamW, lr {c.get('learning_rate', '?')}, weight decay {c.get('weight_decay', '?')}"),
        ("condition dropout", ", ".join(f"{k} {v:.0%}" for k, v in c.get("drop_rates", {}).items()) or "-"),
        ("reference", "the target itself (self pairing)" if c.get("pairing", "self") == "self" else
                      f"{c['pairing']} pairing: {c.get('pairing_rule') or '-'}; "
                      f"{c.get('pairing_self_prob') or 0:.0%} of samples the target itself"),
        ("precision", f"{PRECISION.get(c.get('mixed_precision'), '?')}; gradient checkpointing "
                      f"{'on' if c.get('gradient_checkpointing') else 'off'}"),
        ("seed, device", f"{c.get('seed', '?')}, {c.get('device', '?')}"),
    ]
    if run.train_seconds is not None:
        rows.append(("training time", f"{run.train_seconds / 60:.1f} min of training steps "
                                      f"(median {run.seconds_per_step:.2f} s/step; loading not counted)"))
        rows.append(("loss", f"{run.loss_start:.4f} (first 10% of steps) -> {run.loss_end:.4f} (last 10%)"))
    return "\n".join(["| setting | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def _license_text(run: RunInfo, license: str) -> str:
    if license == LICENSE and run.data_source == RICK_AND_MORTY:
        why = (f"The training data, [{RICK_AND_MORTY}](https://huggingface.co/datasets/{RICK_AND_MORTY}), is "
               "cc-by-nc-sa-4.0; weights fitted to it inherit its terms: non-commercial use, attribution, share alike.")
    elif license == LICENSE:
        why = ("cc-by-nc-sa-4.0 is this project's default (the Rick and Morty drawings it was built for carry it); "
               "if you trained on other data, set the licence your data allows.")
    else:
        why = "The licence was chosen by the uploader."
    return (f"## Licence\n\n`{license}`. {why} The starting point, `h94/IP-Adapter`, is Apache-2.0; Stable "
            "Diffusion 1.5, which the adapter runs in, has its own CreativeML OpenRAIL-M licence.")


def card_text(run: RunInfo, *, repo_id: str | None = None, evaluation: Evaluation | None = None,
              samples: bool = False, license: str = LICENSE) -> str:
    """The card's Markdown body (no metadata)."""
    ref = repo_id or "user/repo"
    # Hub ids as trained; a run on local models (the tiny profile) shows where to put their paths instead
    # ("./": a placeholder must read as a local path, never as a Hub repo "path/to")
    base = run.base_model if is_hub_id(run.base_model) else "./path/to/the/base/model" if run.base_model else SD15
    ip = (run.ip_adapter if public_name(run.ip_adapter) == run.ip_adapter else "./path/to/ip-adapter.safetensors"
          ) if run.ip_adapter else IP_ADAPTER_PLUS
    title = "Text-aware IP-Adapter Plus (SD 1.5)" if run.variant == "text_aware" else "IP-Adapter Plus, fine-tuned (SD 1.5)"
    parts = []
    if run.random_weights:
        parts.append("**These weights are random**: a run of the `tiny` profile (small random-weight models and "
                     "synthetic drawings, built offline for tests). It generates noise; use it only to check code.")
    elif run.profile == "unknown":
        parts.append("*The run's profile was not recorded: check how these weights were trained before use.*")
    parts += [f"# {title}", CARD_INTRO[run.variant],
              f"Trained with the notebooks of [{REPO}](https://github.com/{REPO}) (notebook 03). "
              f"Variant `{run.variant}`; {run.tensors} tensors, {run.size_mb:.1f} MB.",
              "## How to load it",
              "```python\n" + use_snippet(run.variant, ref, base_model=base, ip_adapter=ip) + "```"]
    if run.variant == "text_aware":
        parts.append("`adapter=` also takes a local `adapter.safetensors` or the folder holding it. Other SD 1.5 "
                     "checkpoints work as the base (pass `vae=` for another VAE), but the adapter was trained on "
                     "Stable Diffusion 1.5: anything else is a transfer, not what was trained.")
    else:
        parts.append("The image encoder is IP-Adapter Plus's ViT-H/14 (`h94/IP-Adapter`, `models/image_encoder`). "
                     "Other SD 1.5 checkpoints work as the base, but the adapter was trained on Stable Diffusion 1.5: "
                     "anything else is a transfer.")
    parts += ["## Training", _training_table(run)]
    if evaluation is not None:
        parts.append(evaluation_markdown(evaluation, with_plot=evaluation.tradeoff is not None))
    if samples:
        parts += ["## Samples", f"![Samples: held-out references and prompts, the pretrained adapter beside this one]"
                                f"({SAMPLES_FILE})",
                  "Held-out references (never trained on) with a few prompts; the pretrained IP-Adapter Plus beside "
                  "this adapter, same seeds." + (" Random weights: noise." if run.random_weights else "")]
    parts.append(_license_text(run, license))
    return "\n\n".join(parts) + "\n"


def make_card(run: RunInfo, *, repo_id: str | None = None, evaluation: Evaluation | None = None,
              samples: bool = False, license: str = LICENSE):
    """A huggingface_hub.ModelCard: card_data() as YAML, then card_text()."""
    from huggingface_hub import ModelCard

    data = card_data(run, license=license)
    body = card_text(run, repo_id=repo_id, evaluation=evaluation, samples=samples, license=license)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
