"""The `evaluate` stage's embedding work done by transformers, for timing next to dreampipe
(bench/evaluate.sh): CLIP image embeddings (visual_projection of the pooled vision output) and
DINO [CLS] embeddings of every image in a folder, in batches, plus one CLIP text embedding.

Pinned: torch 2.11.0, transformers 5.24.0, pillow 13.0.0 (the PIL image processors, as the
stage reproduces). Usage: python evaluate_transformers.py CLIP_DIR DINO_DIR IMAGES_DIR THREADS BATCH
Prints seconds for loading and for embedding, and the peak resident memory.
"""
import resource
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil


def main():
    clip_dir, dino_dir, images_dir = (Path(a) for a in sys.argv[1:4])
    threads, batch = int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)
    started = time.perf_counter()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    dino = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    clip_processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    dino_processor = ViTImageProcessorPil.from_pretrained(dino_dir)
    tokenizer = CLIPTokenizer(str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt"))
    loaded = time.perf_counter()
    files = sorted(images_dir.glob("*.png"))
    with torch.no_grad():
        for start in range(0, len(files), batch):
            images = [Image.open(f).convert("RGB") for f in files[start:start + batch]]
            pixels = clip_processor(images, return_tensors="pt")["pixel_values"]
            clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
            pixels = dino_processor(images, return_tensors="pt")["pixel_values"]
            dino(pixel_values=pixels).last_hidden_state[:, 0]
        ids = tokenizer("a photo of dog", padding="max_length", max_length=77, return_tensors="pt")
        clip.text_projection(clip.text_model(input_ids=ids["input_ids"]).pooler_output)
    done = time.perf_counter()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"transformers: load {loaded - started:.1f} s, {len(files)} images {done - loaded:.1f} s, peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
