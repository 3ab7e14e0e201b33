"""What the full profile's defaults cost on a T4, counted on a CPU without a GPU and without weights (issue 19).

    python bench/t4_budget.py                       # the full profile: writes helpers/support/t4_budget.json
    python bench/t4_budget.py --profile tiny --output /tmp/b.json    # the same plumbing on the tiny models
    python bench/t4_budget.py --only segmenter      # the segmenter again (seconds), the other counts kept

The models are SD 1.5 + IP-Adapter Plus at their real sizes, built by the project's own builders on the meta
device and copied to fake tensors (bench/_t4_counting.py): shapes and dtypes, no memory, no values. On them
run the real steps (bench/_t4_steps.py, which the GPU check runs too), as a T4 runs them
(bench/_t4_emulation.py, checked against CUDA's own autocast kernels by bench/_t4_check.py):

    training  helpers.train.step.training_step: the feature cache's batch with condition dropout,
              diffusion_loss, Accelerate's backward, clipping and AdamW step; frozen UNet in fp16, adapter
              in fp32, Accelerate's fp16 autocast (CUDA's cast policy, emulated on CPU tensors) and GradScaler;
              AdamW foreach, as torch picks it on CUDA. Counted at the second step, when AdamW's state exists.
    sampling  the stock StableDiffusionPipeline call that helpers.sample.generate makes (a guided batch of
              the evaluation's size, the profile's DDIM steps), then the VAE decode, one image at a time
              (generate enables VAE slicing on a GPU); and pipe.encode_image once per reference.
    segmenter CLIPSeg (helpers.data.masks: notebook 01 masks every row, notebook 05 segments every output for
              its subject scores) from its published config, fp16, one call of segment's batch.
    SDPA      the memory-efficient kernel: sm75 has no flash attention.

Memory is torch's MemTracker (adapted: bench/_t4_counting.FrozenAwareMemTracker), what
torch.cuda.max_memory_allocated would report; a T4 adds the CUDA context and the allocator's slack on top.
FLOPs are FlopCounterMode's (matmuls, convolutions, attention). Minutes are FLOPs over a stated fraction of
the T4's 65 TFLOPS fp16 peak: projections, named with their efficiency, not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import tempfile
import time
from pathlib import Path

import _common as C
import _t4_check as X
import _t4_counting as K
import _t4_emulation as E
import _t4_steps as S
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

BUDGET_FILE = C.ROOT / "helpers" / "support" / "t4_budget.json"
T4_MEMORY_LIMIT_GIB = 13.0  # what a change may count at the profile's defaults: a free T4 shows ~15 GiB


def build_pipeline(profile, variant: str, mode, device: str = "cpu"):
    """The profile's pipeline (S.profile_pipeline) with every weight a fake fp16 tensor on `device` ("cuda"
    only for the emulation check's forward): SD 1.5 built on the meta device, the tiny models loaded."""
    pipe = S.profile_pipeline(profile, variant, device="meta")
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        K.fake_copy(getattr(pipe, name), mode, device)
    return pipe


@contextlib.contextmanager
def own_accelerate_state():
    """Accelerate keeps one process-wide state; this count's fp16 Accelerator gets a fresh one and leaves the
    caller's as it was."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    saved = [(cls, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState, GradientState)]
    for cls, _ in saved:
        cls._shared_state.clear()
    try:
        yield
    finally:
        for cls, state in saved:
            cls._shared_state.clear()
            cls._shared_state.update(state)


def count_training(profile, variant: str, *, checkpointing: bool = False) -> dict:
    """Peak memory (GiB, with its parts) and TFLOP of training step 2 (AdamW's state made in step 1)."""
    from helpers.train.step import training_step

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    unet = build_pipeline(profile, variant, mode).unet
    with own_accelerate_state(), tempfile.TemporaryDirectory() as tmp, E.cuda_autocast_on_cpu(), E.t4_attention():
        run = S.training_run(unet, profile, variant, out=Path(tmp), checkpointing=checkpointing, mode=mode)
        with mode, K.StandInValues(run.optimizer):
            training_step(run, 0)  # AdamW's state, the GradScaler's scale
        with mode, K.Counted(unet, run.optimizer) as counted:
            training_step(run, 1)
    trainable = sum(p.numel() for p in run.params.values())
    frozen = sum(p.numel() for p in unet.parameters()) - trainable
    return {"peak_gib": counted.peak_gib(), "parts_gib": counted.parts_gib(), "tflop": counted.tflop(),
            "trainable_parameters": trainable, "frozen_parameters": frozen}


# --------------------------------------------------------------------------------------------------
# Sampling: the pipeline call of helpers.sample.generate, and the image encoder
# --------------------------------------------------------------------------------------------------


def count_sampling(profile, variant: str, batch: int, *, steps: int) -> dict:
    """One generate() pipeline call for `batch` images of one reference at `steps` denoising steps, then the VAE
    decode one image at a time, with the bank's models all on the device. Returns peak GiB (denoising and
    decode) with the parts, TFLOP of the call and of the decode, the UNet's TFLOP per denoising step (the
    last step's), and the image encoder's TFLOP for one reference (encode_image: the image and a zero image)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    pipe = build_pipeline(profile, variant, mode)
    pipe.set_progress_bar_config(disable=True)
    models = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder]
    size = pipe.image_encoder.config.image_size
    marks = []
    with E.t4_attention():
        with mode:
            pixels = torch.empty(1, 3, size, size, dtype=torch.float16)  # the CLIPImageProcessor's output
        with mode, K.Counted(*models) as encoder, torch.no_grad():
            embeds = S.reference_embeds(pipe, pixels, profile.guidance_scale > 1)
        with mode, K.Counted(*models) as counted:
            latents = S.pipeline_call(pipe, profile, batch, steps, embeds,
                                      on_step=lambda: marks.append(counted.flops.get_total_flops()))
        with mode, K.Counted(*models, latents) as decoded:  # the latents count as "other"
            S.decode(pipe, latents)
    return {"peak_gib": max(counted.peak_gib(), decoded.peak_gib()), "parts_gib": counted.parts_gib(),
            "denoising_peak_gib": counted.peak_gib(), "decode_peak_gib": decoded.peak_gib(),
            "tflop": counted.tflop() + decoded.tflop(), "decode_tflop": decoded.tflop(),
            "unet_tflop_per_step": (marks[-1] - (marks[-2] if len(marks) > 1 else 0)) / 1e12,
            "image_encoder_tflop": encoder.tflop(), "adapter_gib_fp16": _adapter_gib(pipe.unet)}


def _adapter_gib(unet) -> float:
    """One adapter's weights at fp16 (what the bank keeps on the device for each trained model)."""
    from helpers.model.official_format import adapter_parameters

    return sum(p.numel() for p in adapter_parameters(unet).values()) * 2 / K.GIB


# --------------------------------------------------------------------------------------------------
# The segmenter: CLIPSeg, as helpers.data.masks runs it (01's masks of every row, 05's subject scores)
# --------------------------------------------------------------------------------------------------


def segmenter_batch() -> int:
    """Images per CLIPSeg call: helpers.data.masks.segment's default batch_size (prepare_masks passes its own
    default, the same)."""
    import inspect

    from helpers.data.masks import prepare_masks, segment

    batches = {inspect.signature(f).parameters["batch_size"].default for f in (segment, prepare_masks)}
    if len(batches) != 1:
        raise ValueError(f"helpers.data.masks: segment and prepare_masks default to different batches {batches}; "
                         "count the one notebook 01 and 05 use")
    return batches.pop()


def count_segmenter(profile, batch: int | None = None) -> dict:
    """One CLIPSeg call of `batch` (image, prompt) pairs (default segmenter_batch()) as load_segmenter runs it on
    a GPU (fp16 weights, no autocast, SDPA as the memory-efficient kernel), its sigmoid and the resize to the
    profile's resolution; and a call of one, for the memory per image. The prompts fill the text tower's 77
    positions (an upper bound: the processor pads to a batch's longest prompt, and subject words are a few
    tokens; 8 tokens would count 5% fewer FLOPs). Returns TFLOP per image, peak GiB of the call with its parts,
    GiB per image, the parameters, the input size."""
    batch = batch or segmenter_batch()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = K.fake_copy(S.segmenter_model(profile, device="meta"), mode)
    size = S.segmenter_size(profile)
    counts = {}
    for b in sorted({1, batch}):
        with mode:
            inputs = S.segmenter_inputs(model, b, size)
        with E.t4_attention(), mode, K.Counted(model) as counted:
            S.segment_call(model, inputs, profile.resolution)
        counts[b] = counted
    c, one = counts[batch], counts[1]
    per_image = (c.peak_gib() - one.peak_gib()) / (batch - 1) if batch > 1 else one.peak_gib() - one.parts_gib()[
        "parameters"]
    return {"model": str(profile.segmenter), "image_size": size, "text_positions": inputs["input_ids"].shape[1],
            "resolution": profile.resolution, "batch": batch, "tflop_per_image": c.tflop() / batch,
            "peak_gib": c.peak_gib(), "parts_gib": c.parts_gib(), "gib_per_image": per_image,
            "parameters": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------------------------------
# The emulation, checked against CUDA's own autocast kernels
# --------------------------------------------------------------------------------------------------


def check_emulation(profile, variant: str = "text_aware") -> dict:
    """The UNet call of diffusion_loss (batch 1, frozen fp16 weights, fp32 adapter, under fp16 autocast as
    Accelerate runs it) on fake CUDA tensors with CUDA's own autocast kernels, and on fake CPU tensors under
    the emulation: _t4_check.check_against_cuda_autocast's comparison of every op's output dtypes."""
    from helpers.model.official_format import adapter_parameters

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    latent = profile.resolution // 8

    def forward(device):
        unet = build_pipeline(profile, variant, mode, device).unet.requires_grad_(False)
        with mode:
            for p in adapter_parameters(unet).values():
                p.data = p.data.float()
            tokens, width = S.image_feature_shape(unet)
            h16 = dict(dtype=torch.float16, device=device)
            noisy, t = torch.empty(1, 4, latent, latent, **h16), torch.zeros(1, dtype=torch.long, device=device)
            text = torch.empty(1, 77, unet.config.cross_attention_dim, **h16)
            image = torch.empty(1, tokens, width, **h16)
            with X.fp16_autocast(device):
                unet(noisy, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [image[:, None]]})

    return X.check_against_cuda_autocast(forward)


# --------------------------------------------------------------------------------------------------
# The budget: counts, projections, the JSON file
# --------------------------------------------------------------------------------------------------


def count_all(profile, *, train_images: int = S.FULL_TRAIN_IMAGES, dataset_rows: int = S.FULL_DATASET_ROWS,
              variants=S.VARIANTS, checkpointing=(False, True), counted_steps: int = 2, check: bool = True,
              say=print) -> dict:
    """Every count of the budget file at `profile`'s defaults (the module docstring says how): settings,
    training, sampling, the segmenter and, with `check`, the emulation check."""
    out = {"settings": budget_settings(profile, train_images, dataset_rows),
           "training": training_counts(profile, variants, checkpointing, say),
           "sampling": sampling_counts(profile, counted_steps, say),
           "segmenter": segmenter_counts(profile, say)}
    if check:
        t0 = time.perf_counter()
        out["emulation_check"] = check_emulation(profile)
        say(f"  emulation check: {out['emulation_check']['ops']} ops, "
            f"{len(out['emulation_check']['mismatches'])} mismatches ({time.perf_counter() - t0:.0f} s)")
    return out


def budget_settings(profile, train_images: int, dataset_rows: int = S.FULL_DATASET_ROWS) -> dict:
    """The defaults the counts are for: notebook 01's rows (every one masked), notebook 03's runs (vanilla and
    text-aware, and the neighbour-paired model when profile.train_neighbour) and notebook 05's default grid
    (helpers.evaluate.protocol.grid_models)."""
    from helpers.evaluate.protocol import grid_models, grid_size
    from helpers.support.budget import notebook_03_runs

    prompts, references = 1 + profile.eval_edits_per_reference, notebook_05_references(profile)
    models = len(grid_models(profile))
    return {"profile": profile.name, "resolution": profile.resolution, "train_batch_size": profile.train_batch_size,
            "epochs": profile.num_epochs, "train_images": train_images,
            "steps_per_variant": profile.num_epochs * math.ceil(train_images / profile.train_batch_size),
            "notebook_03_runs": notebook_03_runs(profile.train_neighbour),
            "scheduler": profile.scheduler, "inference_steps": profile.num_inference_steps,
            "guidance_scale": profile.guidance_scale, "grid_references": references, "grid_models": models,
            "grid_images": grid_size(references * prompts, models, len(profile.eval_scales), len(profile.eval_seeds)),
            "memory_limit_gib": T4_MEMORY_LIMIT_GIB, "dataset_rows": dataset_rows}


def notebook_05_references(profile) -> int:
    """Notebook 05's default number of references: helpers.evaluate.protocol.grid_references where the protocol
    sizes the grid, else the profile's eval_num_references. grid_references reads the cost per image from the
    packaged budget file as it was before this count (a count that changes that cost needs a second run), and
    leaves out the test split's number of groups (its data is not at hand here)."""
    from helpers.evaluate import protocol

    if hasattr(protocol, "grid_references"):
        return protocol.grid_references(profile, 10**6)
    return profile.eval_num_references


def training_counts(profile, variants, checkpointing, say=print) -> dict:
    """{variant: {"plain" | "checkpointing": count_training(...)}}."""
    training = {}
    for variant in variants:
        for ckpt in checkpointing:
            t0 = time.perf_counter()
            c = count_training(profile, variant, checkpointing=ckpt)
            training.setdefault(variant, {})["checkpointing" if ckpt else "plain"] = c
            say(f"  training {variant}{', gradient checkpointing' if ckpt else ''}: peak {c['peak_gib']:.2f} GiB, "
                f"{c['tflop']:.2f} TFLOP/step ({time.perf_counter() - t0:.0f} s)")
    return training


def sampling_counts(profile, counted_steps: int, say=print) -> dict:
    """Per image at the evaluation's batch (the text-aware model; vanilla lacks only the block's attention of 16
    image tokens over 77 text positions), per reference, and memory: per image (from calls of 1 and of the
    evaluation's batch) and what a call needs besides (the larger of the denoising's rest and the decode)."""
    from helpers.sample.registry import FINETUNED

    b, steps = S.eval_batch(profile), profile.num_inference_steps
    counted_steps = min(counted_steps, steps)
    t0 = time.perf_counter()
    s = count_sampling(profile, "text_aware", b, steps=counted_steps)
    one = count_sampling(profile, "text_aware", 1, steps=1)
    say(f"  sampling, batch {b}: peak {s['peak_gib']:.2f} GiB, {s['unet_tflop_per_step']:.2f} TFLOP per guided "
        f"UNet step ({time.perf_counter() - t0:.0f} s)")
    call = s["tflop"] + (steps - counted_steps) * s["unet_tflop_per_step"]  # every step is the same UNet call
    params = s["parts_gib"]["parameters"]
    per_image = ((s["denoising_peak_gib"] - one["denoising_peak_gib"]) / (b - 1) if b > 1
                 else one["denoising_peak_gib"] - params)
    return {"resolution": profile.resolution, "batch": b, "steps": steps, "counted_steps": counted_steps,
            "guidance": profile.guidance_scale, "tflop_per_image": call / b,
            "unet_tflop_per_step": s["unet_tflop_per_step"], "decode_tflop_per_image": s["decode_tflop"] / b,
            "image_encoder_tflop_per_reference": s["image_encoder_tflop"],
            "peak_gib": s["peak_gib"], "parts_gib": s["parts_gib"], "gib_per_image": per_image,
            "call_overhead_gib": max(one["denoising_peak_gib"] - params - per_image, s["decode_peak_gib"] - params),
            "adapter_gib_fp16": s["adapter_gib_fp16"],
            "bank_peak_gib": s["peak_gib"] + len(FINETUNED) * s["adapter_gib_fp16"]}


def segmenter_counts(profile, say=print) -> dict:
    """count_segmenter at the code's batch, said in one line."""
    t0 = time.perf_counter()
    c = count_segmenter(profile)
    say(f"  segmenter {c['model']}: {c['tflop_per_image']:.3f} TFLOP per image at {c['image_size']} px, peak "
        f"{c['peak_gib']:.2f} GiB at batch {c['batch']} ({time.perf_counter() - t0:.0f} s)")
    return c


def _rounded(x):
    """Floats to 4 significant digits, everywhere in a JSON-ready structure (a small, readable file)."""
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def how(counts: dict) -> dict:
    """The file's "how": what was counted, how, with which versions, when."""
    import diffusers
    import transformers

    check = counts.get("emulation_check")
    return {
        "written_by": "python bench/t4_budget.py (issue 19); read with helpers.support.budget",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "models": "SD 1.5 UNet + IP-Adapter Plus (text-aware: + the text-image block), VAE, CLIP text encoder, "
                  "ViT-H/14 image encoder at their real sizes (helpers.model.sd15) as fake tensors: shapes and "
                  "dtypes, no weights",
        "training": "helpers.train.step.training_step, step 2 (AdamW state from step 1); frozen fp16, trainable "
                    "fp32; Accelerate fp16 autocast + GradScaler; AdamW foreach",
        "sampling": f"StableDiffusionPipeline call as helpers.sample.generate makes it (text-aware model), "
                    f"{counts['sampling']['counted_steps']} denoising steps counted, the rest of the profile's "
                    "steps at the last one's count; VAE decode one image at a time; pipe.encode_image once per "
                    "reference",
        "emulated": ["CUDA autocast's cast policy (torch's autocast_mode.h lists) on CPU fake tensors",
                     "SDPA as _scaled_dot_product_efficient_attention (sm75: no flash attention)",
                     "AdamW foreach and the GradScaler, as on CUDA"],
        "emulation_check": ((f"{check['ops']} ops of the UNet's forward compared with CUDA's own autocast kernels "
                            f"(fake CUDA tensors): {len(check['mismatches'])} dtype mismatches")
                           if check else "not run"),
        "memory": "torch.distributed._tools.mem_tracker.MemTracker (adapted: frozen parameters, the garbage its own "
                  "hooks leave in checkpointed blocks): allocated bytes in 512-byte blocks, as "
                  "torch.cuda.max_memory_allocated; the CUDA context and the allocator's slack are not included",
        "flops": "torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions, attention",
        "minutes": "projections: counted FLOPs / (efficiency x 65 TFLOPS); not measured",
        "segmenter": segmenter_how(counts["segmenter"]),
    }


def segmenter_how(c: dict, date: str | None = None) -> str:
    """The file's "how" of the segmenter count (`date`: when it was counted, if not with the rest, and then the
    transformers it was counted with)."""
    import transformers

    when = f" (counted {date}, transformers {transformers.__version__})" if date else ""
    return (f"{c['model']}: CLIPSegForImageSegmentation from its published config (rehearsal/hub_files/) as fake "
            f"fp16 tensors, one call of {c['batch']} (image, prompt) pairs as helpers.data.masks.segment makes it: "
            f"{c['image_size']} px images, prompts padded to {c['text_positions']} positions (an upper bound), "
            f"sigmoid and resize to {c['resolution']} px; no autocast (load_segmenter's fp16 weights), SDPA as the "
            "memory-efficient kernel with the text tower's mask as its additive bias" + when)


def count_budget(profile, **kwargs) -> dict:
    """The budget file's content: how, settings, counts, projections (helpers.support.budget.projections)."""
    from helpers.support.budget import projections
    from helpers.support.budget_counts import EFFICIENCIES, T4_FP16_TFLOPS

    counts = count_all(profile, **kwargs)
    out = _rounded({"how": how(counts), **counts})  # the file's figures; the projections come from them
    out["settings"].update({"t4_fp16_tflops": T4_FP16_TFLOPS, "efficiencies": list(EFFICIENCIES)})
    out["projections"] = _rounded(projections(out))
    return out


def update_segmenter(profile, path: Path, say=print) -> dict:
    """The budget file at `path` with its segmenter count made again and its projections recomputed; every other
    count is kept as it is (byte for byte). Refused when the file's settings are not the profile's defaults now
    (then every count is stale: run the full count)."""
    from helpers.support.budget import projections
    from helpers.support.budget_counts import EFFICIENCIES, T4_FP16_TFLOPS

    old = json.loads(path.read_text())
    settings = _rounded(budget_settings(profile, old["settings"]["train_images"]))
    settings.update({"t4_fp16_tflops": T4_FP16_TFLOPS, "efficiencies": list(EFFICIENCIES)})
    stale = sorted(k for k in old["settings"] if old["settings"][k] != settings.get(k))
    if stale:
        raise SystemExit(f"{path}: counted at other settings than the {profile.name} profile's defaults now "
                         f"({', '.join(stale)}): run the full count, python bench/t4_budget.py")
    segmenter = _rounded(segmenter_counts(profile, say))
    how_ = {**old["how"], "segmenter": segmenter_how(segmenter, datetime.date.today().isoformat())}
    out = {"how": how_, "settings": settings, "training": old["training"], "sampling": old["sampling"],
           "segmenter": segmenter, **({"emulation_check": old["emulation_check"]} if "emulation_check" in old else {})}
    out["projections"] = _rounded(projections(out))
    return out


def budget_lines(b: dict) -> list[str]:
    """The counts in detail (every part of each peak), then helpers.support.budget.summary_lines: the
    projections, each minute figure with its efficiency."""
    from helpers.support.budget import summary_lines

    st, lines = b["settings"], []
    lines.append(f"T4 budget, {st['profile']} profile: {st['resolution']} px, batch {st['train_batch_size']}, "
                 f"{st['steps_per_variant']} steps per variant ({st['epochs']} epochs over {st['train_images']} "
                 "images)")
    for variant, runs in b["training"].items():
        for kind, c in runs.items():
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in c["parts_gib"].items() if v >= 0.005)
            lines.append(f"  training {variant:<10} {kind:<13} peak {c['peak_gib']:5.2f} GiB ({parts}); "
                         f"{c['tflop']:.2f} TFLOP/step")
    s = b["sampling"]
    lines.append(f"  sampling: {s['tflop_per_image']:.1f} TFLOP per image ({s['steps']} steps, guidance "
                 f"{s['guidance']:g}, batch {s['batch']}, VAE decode {s['decode_tflop_per_image']:.2f}); image "
                 f"encoder {s['image_encoder_tflop_per_reference']:.2f} TFLOP per reference; peak {s['peak_gib']:.2f} "
                 f"GiB, {s['gib_per_image']:.3f} GiB per image + {s['call_overhead_gib']:.2f} GiB per call")
    g = b["segmenter"]
    lines.append(f"  segmenter {g['model']}: {g['tflop_per_image']:.3f} TFLOP per image ({g['image_size']} px, "
                 f"{g['parameters'] / 1e6:.0f} M parameters); peak {g['peak_gib']:.2f} GiB at batch {g['batch']} "
                 f"(parameters {g['parts_gib']['parameters']:.2f}), {g['gib_per_image']:.3f} GiB per image")
    limit = st["memory_limit_gib"]
    worst = max(c["peak_gib"] for runs in b["training"].values() for c in runs.values())
    verdict = "within" if worst <= limit else "OVER"
    lines.append(f"  largest training peak {worst:.2f} GiB: {verdict} the {limit:g} GiB limit")
    if "emulation_check" in b:
        lines.append(f"  emulation check: {b['how']['emulation_check']}")
    return lines + [""] + summary_lines(b)


def main(argv=None):
    C.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--profile", default="full", choices=["full", "tiny"],
                    help="whose defaults and models (default full)")
    ap.add_argument("--output", default=None, help=f"JSON file (default: {BUDGET_FILE.relative_to(C.ROOT)} for full; "
                                                    "tiny needs one)")
    ap.add_argument("--variants", default=",".join(S.VARIANTS), help="training variants to count")
    ap.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing counts")
    ap.add_argument("--no-check", action="store_true", help="skip the emulation check against CUDA autocast")
    ap.add_argument("--train-images", type=int, default=S.FULL_TRAIN_IMAGES,
                    help="training split size (default %(default)s)")
    ap.add_argument("--only", choices=["segmenter"], default=None,
                    help="count only this part again, into the existing file (--output or the package file), keeping "
                         "every other count as it is, and recompute the projections")
    args = ap.parse_args(argv)
    if args.profile == "tiny" and args.output is None:
        ap.error("--profile tiny writes no package file: give --output")
    from helpers.profile import get_profile

    profile = get_profile(args.profile, announce=False)
    t0 = time.perf_counter()
    out = Path(args.output) if args.output else BUDGET_FILE
    if args.only:
        print(f"counting the {profile.name} profile's {args.only} again into {out}; the other counts stay")
        b = update_segmenter(profile, out)
    else:
        print(f"counting the {profile.name} profile's defaults on fake tensors (torch {torch.__version__}, no GPU "
              "needed)")
        b = count_budget(profile, train_images=args.train_images, variants=tuple(args.variants.split(",")),
                         checkpointing=(False,) if args.no_checkpointing else (False, True), check=not args.no_check)
    print("\n".join(budget_lines(b)))
    out.write_text(json.dumps(b, indent=1) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return b


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # the tiny profile's loading bars
    transformers_logging.disable_progress_bar()
    main()
