"""Loads folders written by `dreampipe model init` with diffusers' StableDiffusionPipeline.

Usage: python bench/check_diffusers_load.py DIR [DIR ...] [--run]

For every DIR: `StableDiffusionPipeline.from_pretrained(DIR)` must succeed; prints each
component's class, parameter count and dtype, checks that no parameter is non-finite and that
the loaded state dict has exactly the keys and values of the weights file (nothing missing,
unexpected or re-initialised by the loader).
With --run (meant for the tiny model), also runs 2 denoising steps at the UNet's native size
and checks that the image is finite. Exits non-zero on the first failure.
"""

import sys

import os

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def describe(name, module):
    params = list(module.parameters())
    count = sum(p.numel() for p in params)
    dtypes = sorted({str(p.dtype) for p in params})
    finite = all(torch.isfinite(p).all().item() for p in params)
    print(f"  {name:<13} {type(module).__name__:<22} {count:>12,} params  {','.join(dtypes)}  finite={finite}")
    if not finite:
        raise SystemExit(f"{name}: non-finite parameters")


def same_as_file(name, module, file):
    expected = load_file(file)
    loaded = module.state_dict()
    # transformers 5's CLIPTextModel has no `text_model` wrapper: it maps the checkpoint's
    # `text_model.` keys on load, so compare under its names.
    prefix = "text_model."
    if not any(k.startswith(prefix) for k in loaded):
        expected = {k.removeprefix(prefix): v for k, v in expected.items()}
    if set(loaded) != set(expected):
        missing = sorted(set(expected) - set(loaded))[:5]
        extra = sorted(set(loaded) - set(expected))[:5]
        raise SystemExit(f"{name}: keys differ from {file}: file-only {missing}, model-only {extra}")
    for key, value in expected.items():
        if not torch.equal(loaded[key].to(value.dtype), value):
            raise SystemExit(f"{name}: '{key}' differs from {file}")
    print(f"  {name:<13} state dict == {os.path.basename(file)} ({len(expected)} tensors)")


def check(folder, run):
    print(f"{folder}:")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        describe(name, getattr(pipe, name))
        same_as_file(name, getattr(pipe, name), os.path.join(folder, WEIGHT_FILES[name]))
    print(f"  tokenizer     {type(pipe.tokenizer).__name__:<22} vocab {len(pipe.tokenizer)}")
    print(f"  scheduler     {type(pipe.scheduler).__name__}")
    if run:
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        pipe = pipe.to(torch.float32)
        image = pipe(
            "a photo of a cat",
            num_inference_steps=2,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]
        print(f"  2-step run: image {image.shape}, mean {image.mean():.4f}, std {image.std():.4f}, finite={bool((image == image).all())}")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    run = "--run" in sys.argv
    if not args:
        raise SystemExit(__doc__)
    for folder in args:
        check(folder, run)
    print("OK")


if __name__ == "__main__":
    main()
