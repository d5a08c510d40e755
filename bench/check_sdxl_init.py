"""Checks that diffusers loads the SDXL folder `dreampipe model init --like sdxl` writes.

Usage: python bench/check_sdxl_init.py FOLDER   (e.g. after
`dreampipe model init --like sdxl --dtype f16 --out FOLDER`, ~7 GB)

Loads every component with diffusers 0.42.1 / transformers 5.24.0 and fails when a weight is
missing, unexpected or of another shape (the loaders' reports), then checks the pipeline class
and that the parameter counts are SDXL base 1.0's.
"""
import sys

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

EXPECTED = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
            "text_encoder_2": 694_659_840}


def count(module):
    return sum(p.numel() for p in module.parameters())


def main(folder):
    failed = False
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for name, cls in loaders.items():
        model, info = cls.from_pretrained(folder, subfolder=name, torch_dtype=torch.float16,
                                          output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs"} if isinstance(info, dict) else {}
        ok = not problems and count(model) == EXPECTED[name]
        failed |= not ok
        print(f"{name}: {count(model):,} parameters, loading report {problems or 'clean'}: "
              f"{'ok' if ok else 'FAILED'}")
        del model
    pipe_class = StableDiffusionXLPipeline.load_config(folder)["_class_name"]
    print(f"model_index: {pipe_class}")
    failed |= pipe_class != "StableDiffusionXLPipeline"
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1])
