"""helpers.model.adapter_file: saved adapters round-trip, load in plain diffusers, and bad files fail with clear errors."""
import shutil

import pytest
import torch
from _adapters import make_text_aware_nonzero, run
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from helpers.model.adapter_file import AdapterFileError, read_adapter_file, save_adapter
from helpers.model.official_format import adapter_state_dict
from helpers.model.pipeline import load_pipeline


@pytest.mark.parametrize("variant", ["vanilla", "text_aware"])
def test_save_load_round_trip(variant, paths, tmp_path, reference_image):
    pipe = load_pipeline(*paths, variant=variant)
    with torch.no_grad():  # move every adapter weight away from the pretrained file
        for p in pipe.unet.encoder_hid_proj.parameters():
            p.add_(0.01)
    if variant == "text_aware":
        make_text_aware_nonzero(pipe)
    path = save_adapter(pipe, tmp_path / "adapter.safetensors", metadata={"training_config": {"lr": 1e-4}})
    again = load_pipeline(*paths, variant=variant, adapter=path)
    a, b = adapter_state_dict(pipe.unet), adapter_state_dict(again.unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("text_image_attn.") for k in a) == (variant == "text_aware")
    assert again.adapter_info["variant"] == variant and again.adapter_info["training_config"] == '{"lr": 0.0001}'
    assert torch.equal(run(again, reference_image), run(pipe, reference_image))


def test_saved_vanilla_file_loads_in_plain_diffusers(paths, tiny_root, tmp_path, reference_image):
    pipe = load_pipeline(*paths, variant="vanilla")
    with torch.no_grad():
        for proc in pipe.unet.attn_processors.values():
            if hasattr(proc, "to_k_ip"):
                proc.to_k_ip[0].weight.mul_(1.5)
    save_adapter(pipe, tmp_path / "mine.safetensors")
    shutil.copytree(tiny_root / "ip_adapter" / "image_encoder", tmp_path / "image_encoder")
    plain = StableDiffusionPipeline.from_pretrained(tiny_root / "sd15", local_files_only=True)
    plain.load_ip_adapter(str(tmp_path), subfolder="", weight_name="mine.safetensors", image_encoder_folder="image_encoder")
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)  # the sampler load_pipeline sets
    assert torch.equal(run(plain, reference_image), run(pipe, reference_image))


@pytest.fixture(scope="module")
def saved(paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    return {v: save_adapter(load_pipeline(*paths, variant=v), folder / f"{v}.safetensors") for v in ("vanilla", "text_aware")}


def test_text_aware_file_refused_as_vanilla(paths, saved):
    with pytest.raises(AdapterFileError, match=r"text_aware.safetensors is a text-aware adapter .*variant='text_aware'"):
        load_pipeline(*paths, variant="vanilla", adapter=saved["text_aware"])


def test_vanilla_file_refused_as_text_aware(paths, saved):
    with pytest.raises(AdapterFileError, match=r"vanilla.safetensors is a vanilla adapter .*variant='vanilla'"):
        load_pipeline(*paths, variant="text_aware", adapter=saved["vanilla"])


def edited(src, dst, change):
    sd = load_file(str(src))
    change(sd)
    save_file(sd, str(dst))
    return dst


def test_missing_keys_are_named(paths, saved, tmp_path):
    bad = edited(saved["vanilla"], tmp_path / "missing.safetensors", lambda sd: sd.pop("ip_adapter.31.to_v_ip.weight"))
    with pytest.raises(AdapterFileError, match=r"(?s)missing.safetensors does not fit .*1 missing: ip_adapter.31.to_v_ip.weight"):
        load_pipeline(*paths, adapter=bad)


def test_misshaped_keys_are_named(paths, saved, tmp_path):
    def shrink(sd):
        sd["ip_adapter.1.to_k_ip.weight"] = sd["ip_adapter.1.to_k_ip.weight"][:, :8].contiguous()

    bad = edited(saved["vanilla"], tmp_path / "shape.safetensors", shrink)
    with pytest.raises(AdapterFileError, match=r"ip_adapter.1.to_k_ip.weight has shape \(32, 8\), expected \(32, 32\)"):
        load_pipeline(*paths, adapter=bad)


def test_misshaped_block_is_named(paths, saved, tmp_path):
    def shrink(sd):
        sd["text_image_attn.to_q.weight"] = sd["text_image_attn.to_q.weight"][:16].contiguous()

    bad = edited(saved["text_aware"], tmp_path / "block.safetensors", shrink)
    with pytest.raises(AdapterFileError, match=r"text_image_attn.to_q.weight has shape \(16, 32\)"):
        load_pipeline(*paths, variant="text_aware", adapter=bad)


def test_base_ip_adapter_and_garbage_files_are_refused(paths, tmp_path):
    base = tmp_path / "ip-adapter_sd15.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4 * 32, 16), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 32)}, str(base))
    with pytest.raises(AdapterFileError, match="base IP-Adapter .*IP-Adapter Plus"):
        load_pipeline(*paths, adapter=base)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(AdapterFileError, match="junk.safetensors: not a readable safetensors file"):
        load_pipeline(*paths, adapter=junk)
    with pytest.raises(AdapterFileError, match="nothing.safetensors: no such file"):
        load_pipeline(*paths, adapter=tmp_path / "nothing.safetensors")
    pickle = tmp_path / "evil.bin"
    torch.save({"image_proj": {}, "ip_adapter": {}, "code": print}, pickle)  # not weights-only
    with pytest.raises(AdapterFileError, match=r"evil.bin: refused to load this adapter file: it holds Python "
                                               r"objects besides tensors \(print\).*Use a .safetensors file"):
        load_pipeline(*paths, adapter=pickle)


class NotATensor:
    """What an untrusted pickle may hold beside its tensors."""


def messages(error: BaseException) -> str:
    """Every message a traceback of `error` shows: its own and those of the causes Python prints with it."""
    shown = []
    while error is not None:
        shown.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return "\n".join(shown)


def test_a_refused_pickle_says_use_safetensors_and_not_torchs_advice(tmp_path):
    pickle = tmp_path / "adapter.bin"
    torch.save({"image_proj": {"latents": torch.zeros(2)}, "ip_adapter": {}, "extra": NotATensor()}, pickle)
    with pytest.raises(Exception, match="weights_only"):  # torch's own advice, which must not reach the user
        torch.load(pickle, map_location="cpu", weights_only=True)
    with pytest.raises(AdapterFileError) as caught:
        read_adapter_file(pickle)
    shown = messages(caught.value)
    assert f"{pickle}: refused to load this adapter file: it holds Python objects besides tensors (" in shown
    assert "NotATensor)" in shown and "Use a .safetensors file instead" in shown
    assert "weights_only" not in shown and "WeightsUnpickler" not in shown
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(AdapterFileError, match=r"junk.pt: refused .*not a torch weights file .*\.safetensors") as caught:
        read_adapter_file(junk)
    assert "weights_only" not in messages(caught.value)
    good = tmp_path / "official.bin"  # the official layout, tensors only, still loads
    torch.save({"image_proj": {"latents": torch.ones(2)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(1)}}, good)
    tensors, meta = read_adapter_file(good)
    assert set(tensors) == {"image_proj.latents", "ip_adapter.1.to_k_ip.weight"} and meta == {}
