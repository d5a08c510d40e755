"""Checks that diffusers loads single files dreampipe writes and renders dreampipe's image.

Usage: python bench/check_single_file.py DREAMPIPE_BINARY

For each SD-shaped fixture folder in tests/fixtures/single-file (SD 1.x and SD 2.x layouts):
`dreampipe model export FOLDER --out F.safetensors --dtype f32`, then
`StableDiffusionPipeline.from_single_file(F, config=FOLDER)` must load every tensor equal to the
folder's, and its DDIM image (CPU generator, seed 3, 2 steps, 64x64, guidance 7.5) must equal
`dreampipe sample --model F.safetensors --config FOLDER` with the same settings to within one
8-bit level per channel (the images dreampipe renders match diffusers' to the goldens' tolerances;
tests/goldens/sd_pipeline.rs). Prints one line per model and exits non-zero on a failure.
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "single-file"
PROMPT, SEED, STEPS, SIZE, GUIDANCE = "a photo of a dog", 3, 2, 64, 7.5


def dreampipe(binary, work, *args):
    subprocess.run([binary, "--device", "cpu", "--cache", str(work / "cache"), *args], check=True,
                   stdout=subprocess.DEVNULL)


def check(binary, stem, work):
    folder = FIXTURES / stem
    file = work / f"{stem}.safetensors"
    dreampipe(binary, work, "model", "export", str(folder), "--out", str(file), "--dtype", "f32")
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(folder))
    reference = StableDiffusionPipeline.from_pretrained(str(folder))
    for name in ["unet", "vae", "text_encoder"]:
        ours, theirs = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        for key, value in theirs.items():
            if not key.endswith("position_ids") and not torch.equal(ours[key], value):
                return f"{stem}: {name}.{key} differs after from_single_file"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    png = work / f"{stem}.png"
    dreampipe(binary, work, "sample", "--model", str(file), "--config", str(folder), "--prompt", PROMPT,
              "--seed", str(SEED), "--steps", str(STEPS), "--width", str(SIZE), "--height", str(SIZE),
              "--guidance", str(GUIDANCE), "--scheduler", "ddim", "--out", str(png))
    ours = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    theirs = np.asarray(image, dtype=np.int16)
    worst = int(np.abs(ours - theirs).max())
    verdict = "ok" if worst <= 1 else "FAILED"
    return f"{stem}: from_single_file loads the folder's tensors; image max difference {worst} level(s): {verdict}"


def main():
    binary = sys.argv[1]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for stem in ["sd15-shaped", "sd2-shaped"]:
            line = check(binary, stem, Path(tmp))
            print(line)
            failed |= not line.endswith(": ok")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
