"""Checks that diffusers loads the LoRA files dreampipe writes and renders dreampipe's image.

Usage: python bench/check_lora.py DREAMPIPE_BINARY

Trains a `dreambooth_lora` stage on the bundled tiny model (3 steps at lr 1e-2, rank 4,
lora_alpha 8 so the diffusers layout folds alpha / rank into `up`, text encoder too) with
`dreampipe run`, then for each file it writes — `pytorch_lora_weights.safetensors` (diffusers)
and `lora_kohya.safetensors` (kohya / A1111) — renders with diffusers
(`StableDiffusionPipeline.load_lora_weights`, DDIM, CPU generator seed 3, 4 steps, 64x64,
guidance 7.5) and with `dreampipe sample --lora FILE` at the same settings. The two PNGs must
agree to within one 8-bit level per channel, and the LoRA must change the image (more than 2
levels from the base). Prints one line per file and exits non-zero on a failure.
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
MODEL = ROOT / "models" / "tiny-sd"
PROMPT, SEED, STEPS, SIZE, GUIDANCE = "a photo of sks dog", 3, 4, 64, 7.5
PIPELINE = """name: lora-check
stages:
  photos:
    kind: images
    path: {photos}
  lora:
    kind: dreambooth_lora
    model: {model}
    instance_images: photos
    instance_prompt: a photo of sks dog
    train_text_encoder: true
    resolution: 64
    train_batch_size: 1
    max_train_steps: 3
    learning_rate: 1.0e-2
    rank: 4
    lora_alpha: 8
"""


def dreampipe(binary, work, *args):
    return subprocess.run([binary, "--device", "cpu", "--cache", str(work / "cache"), *args],
                          check=True, capture_output=True, text=True).stdout


def photos(folder):
    folder.mkdir()
    for index in range(3):
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        pixels[..., 0] = 200
        pixels[..., 1] = np.arange(64, dtype=np.uint8)[None, :] * 4 + index * 20
        Image.fromarray(pixels).save(folder / f"{index}.png")


def train(binary, work):
    photos(work / "photos")
    pipeline = work / "lora.yaml"
    pipeline.write_text(PIPELINE.format(photos=work / "photos", model=MODEL))
    dreampipe(binary, work, "run", "--plain", str(pipeline))
    return work / "cache" / "runs" / "lora-check" / "lora"


def diffusers_image(file):
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if file is not None:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(SEED), output_type="pil")
    return np.asarray(out.images[0], dtype=np.int32)


def dreampipe_image(binary, work, file):
    out = work / f"{file.stem}.png"
    dreampipe(binary, work, "sample", "--model", str(MODEL), "--prompt", PROMPT, "--seed", str(SEED),
              "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--scheduler", "ddim", "--width",
              str(SIZE), "--height", str(SIZE), "--lora", str(file), "--out", str(out))
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int32)


def main():
    binary = sys.argv[1]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = train(binary, work)
        base = diffusers_image(None)
        for name in ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]:
            file = folder / name
            theirs, ours = diffusers_image(file), dreampipe_image(binary, work, file)
            apart = int(np.abs(theirs - ours).max())
            effect = int(np.abs(theirs - base).max())
            ok = apart <= 1 and effect > 2
            failed |= not ok
            print(f"{name}: diffusers vs dreampipe {apart} levels apart; LoRA moves the image "
                  f"{effect} levels from the base: {'ok' if ok else 'FAILED'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
