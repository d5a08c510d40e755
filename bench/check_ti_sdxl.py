"""Checks that diffusers loads the SDXL textual-inversion files dreampipe writes and renders
dreampipe's image.

Usage: python bench/check_ti_sdxl.py DREAMPIPE_BINARY

Trains a `textual_inversion` stage on the bundled tiny SDXL (`<sks>` with two vectors from
`dog`, 3 steps at lr 5e-2, 64 px, a validation prompt) with `dreampipe run`, then renders
"a photo of <sks>" with diffusers' `StableDiffusionXLPipeline` (its folder's Euler scheduler,
CPU generator seed 5, 4 steps, guidance 5, 64x64) three ways:
  * the base model + `load_textual_inversion` of `learned_embeds.safetensors` (first encoder)
    and `learned_embeds_2.safetensors` (second),
  * the base model + `load_textual_inversion` of the A1111/ComfyUI file's `clip_l` and `clip_g`,
  * `from_pretrained` of the stage's `model/` folder,
and compares each with `dreampipe sample --model model/` of "a photo of <sks> <sks>_1" (diffusers
expands a multi-vector token in the prompt; dreampipe takes the tokens as written). The PNGs must
agree to within one 8-bit level per channel and the embedding must change the image (more than 2
levels from the base). Prints one line per way and exits non-zero on a failure.
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-sdxl"
SEED, STEPS, SIZE, GUIDANCE = 5, 4, 64, 5.0
PIPELINE = """name: ti-sdxl-check
stages:
  photos:
    kind: images
    path: {photos}
  ti:
    kind: textual_inversion
    model: {model}
    instance_images: photos
    placeholder_token: <sks>
    initializer_token: dog
    num_vectors: 2
    resolution: 64
    train_batch_size: 2
    max_train_steps: 3
    learning_rate: 5.0e-2
    validation_prompt: a photo of <sks> <sks>_1
    validation_steps: 3
"""


def dreampipe(binary, work, *args):
    return subprocess.run([binary, "--device", "cpu", "--cache", str(work / "cache"), *args],
                          check=True, capture_output=True, text=True).stdout


def photos(folder):
    folder.mkdir()
    for index, (height, width) in enumerate([(64, 80), (72, 64), (64, 64)]):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[..., 2] = 180
        pixels[..., 0] = (np.arange(width, dtype=np.uint8)[None, :] * 3 + index * 40)
        Image.fromarray(pixels).save(folder / f"{index}.png")


def train(binary, work):
    photos(work / "photos")
    pipeline = work / "ti.yaml"
    pipeline.write_text(PIPELINE.format(photos=work / "photos", model=MODEL))
    dreampipe(binary, work, "run", "--plain", str(pipeline))
    return work / "cache" / "runs" / "ti-sdxl-check" / "ti"


def render(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(SEED), output_type="pil")
    return np.asarray(out.images[0], dtype=np.int32)


def with_embeddings(first, second):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(MODEL))
    pipe.load_textual_inversion(first, token="<sks>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(second, token="<sks>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return pipe


def dreampipe_image(binary, work, model):
    out = work / "dreampipe.png"
    dreampipe(binary, work, "sample", "--model", str(model), "--prompt", "a photo of <sks> <sks>_1",
              "--seed", str(SEED), "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--width",
              str(SIZE), "--height", str(SIZE), "--out", str(out))
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int32)


def main():
    binary = sys.argv[1]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = train(binary, work)
        if not list((folder / "validation").glob("*.png")):
            print("no validation image: FAILED")
            failed = True
        ours = dreampipe_image(binary, work, folder / "model")
        base = render(StableDiffusionXLPipeline.from_pretrained(str(MODEL)), "a photo of <sks>")
        a1111 = load_file(folder / "sks.safetensors")
        ways = {
            "learned_embeds + learned_embeds_2": lambda: with_embeddings(
                load_file(folder / "learned_embeds.safetensors")["<sks>"],
                load_file(folder / "learned_embeds_2.safetensors")["<sks>"]),
            "sks.safetensors (clip_l, clip_g)": lambda: with_embeddings(a1111["clip_l"], a1111["clip_g"]),
            "model/ folder": lambda: StableDiffusionXLPipeline.from_pretrained(str(folder / "model")),
        }
        for name, make in ways.items():
            theirs = render(make(), "a photo of <sks>")
            apart = int(np.abs(theirs - ours).max())
            effect = int(np.abs(theirs - base).max())
            ok = apart <= 1 and effect > 2
            failed |= not ok
            print(f"{name}: diffusers vs dreampipe {apart} levels apart; the embedding moves the image "
                  f"{effect} levels from the base: {'ok' if ok else 'FAILED'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
