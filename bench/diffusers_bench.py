#!/usr/bin/env python3
"""The diffusers half of bench/run.sh: times the same work as `dreampipe bench ...` and prints
one JSON line per run (the same fields, "impl": "diffusers").

  txt2img     StableDiffusionPipeline with DDIMScheduler, classifier-free guidance (7.5):
              one untimed warm-up generation (--warmup-steps, default 2), then one timed one; the UNet step
              rate comes from the callback_on_step_end timestamps of steps 2..N, the end-to-end
              time covers prompt encoding, the UNet loop and the VAE decode.
  dreambooth  one optimizer step of examples/dreambooth/train_dreambooth.py's loop (batch 1,
              no prior preservation): VAE encode + sample, scale, randn noise, randint timestep,
              DDPMScheduler.add_noise, text encoder, UNet, F.mse_loss, backward,
              clip_grad_norm_(1.0), AdamW.step (lr 5e-6, wd 1e-2, eps 1e-8),
              zero_grad(set_to_none=False). One untimed warm-up step, then N timed steps.
  make-scaled an "SD-shaped" model scaled down in width: the UNet config of an SD folder with
              every block_out_channels multiplied by --width-scale, random init by diffusers,
              the other components linked from the source folder.

Threads are pinned with torch.set_num_threads(N) and torch.set_num_interop_threads(1), the
same numbers the dreampipe side gives libtorch.
"""
import argparse
import json
import os
import resource
import sys
import time

# train_dreambooth.py defaults.
INSTANCE_PROMPT = "a photo of sks dog"
LEARNING_RATE = 5e-6
WEIGHT_DECAY = 1e-2
ADAM_EPSILON = 1e-8
MAX_GRAD_NORM = 1.0
# The prompt and guidance of the txt2img run (dreampipe: src/bench/txt2img.rs).
BENCH_PROMPT = "a photo of an astronaut riding a horse on mars"
BENCH_GUIDANCE = 7.5
DREAMBOOTH_WARMUP_STEPS = 1


def pin_threads(threads):
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synchronize(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dtype_of(name):
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def dtype_label(name):
    return {"f32": "Float", "f16": "Half", "bf16": "BFloat16"}[name]


def txt2img(args):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    started = time.perf_counter()
    xl = os.path.isdir(os.path.join(args.model, "text_encoder_2"))
    if xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype_of(args.dtype),
                                                         local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            args.model,
            torch_dtype=dtype_of(args.dtype),
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor

    def generate(steps, callback=None):
        return pipe(
            BENCH_PROMPT,
            # SDXL: no negative prompt means zero negative embeddings, what dreampipe does for "".
            negative_prompt=None if xl else "",
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=BENCH_GUIDANCE,
            num_images_per_prompt=args.batch,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
            callback_on_step_end=callback,
        ).images

    with torch.inference_mode():
        if args.warmup_steps > 0:
            generate(args.warmup_steps)
        step_ends = []

        def on_step_end(_pipe, _index, _timestep, kwargs):
            synchronize(args.device)
            step_ends.append((time.perf_counter(), time.process_time()))
            return kwargs

        started, started_cpu = time.perf_counter(), time.process_time()
        images = generate(args.steps, on_step_end)
        synchronize(args.device)
        total_s = time.perf_counter() - started
        total_cpu_s = time.process_time() - started_cpu
    assert images.shape[0] == args.batch
    intervals = [b[0] - a[0] for a, b in zip(step_ends, step_ends[1:])]
    cpu_intervals = [b[1] - a[1] for a, b in zip(step_ends, step_ends[1:])]
    step_s = sum(intervals) / len(intervals)
    return {
        "bench": "txt2img",
        "impl": "diffusers",
        "model": args.label,
        "device": args.device,
        "dtype": dtype_label(args.dtype),
        "size": size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads,
        "load_s": round(load_s, 4),
        "unet_step_s": round(step_s, 4),
        "unet_steps_per_s": round(1.0 / step_s, 4),
        "unet_step_min_s": round(min(intervals), 4),
        "unet_step_times_s": [round(t, 4) for t in intervals],
        "unet_step_cpu_s": round(sum(cpu_intervals) / len(cpu_intervals), 4),
        "e2e_cpu_s_per_image": round(total_cpu_s / args.batch, 4),
        "e2e_s": round(total_s, 4),
        "e2e_s_per_image": round(total_s / args.batch, 4),
        "peak_rss_mib": round(peak_rss_mib(), 4),
    }


class DreamBoothTrainer:
    """The models, optimizer and fixed batch of one train_dreambooth.py run."""

    def __init__(self, args):
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device = args.device
        # accelerate --mixed_precision bf16: frozen modules (and so latents and noise) in bf16,
        # trained modules in float32 under autocast with float32 outputs.
        self.weight_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
        self.mixed_precision = args.mixed_precision
        tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder").to(device)
        self.vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").to(device)
        self.unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device)
        self.noise_scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
        self.vae.requires_grad_(False)
        self.vae.to(dtype=self.weight_dtype)
        self.train_text_encoder = args.train_text_encoder
        if not args.train_text_encoder:
            self.text_encoder.requires_grad_(False)
            self.text_encoder.to(dtype=self.weight_dtype)
        self.unet.train()
        if args.train_text_encoder:
            self.text_encoder.train()
        if args.lora_rank:
            self.params = self.add_lora(args.lora_rank, args.train_text_encoder)
        else:
            self.params = list(self.unet.parameters())
            if args.train_text_encoder:
                self.params += list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=LEARNING_RATE,
            betas=(0.9, 0.999),
            weight_decay=WEIGHT_DECAY,
            eps=ADAM_EPSILON,
        )
        self.input_ids = tokenizer(
            INSTANCE_PROMPT,
            truncation=True,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(device)
        torch.manual_seed(0)
        shape = (1, 3, args.resolution, args.resolution)
        self.pixel_values = (torch.rand(shape) * 2.0 - 1.0).to(device).to(self.weight_dtype)
        self.device = device

    def add_lora(self, rank, train_text_encoder):
        """train_dreambooth_lora.py: base frozen, PEFT adapters (alpha = rank, gaussian init) on
        the UNet's attention projections and, with the text encoder, on its q/k/v/out_proj."""
        from peft import LoraConfig
        from peft import inject_adapter_in_model

        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if train_text_encoder:
            # PEFT's injection directly (transformers' add_adapter wants a newer peft than PyPI has).
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                    self.text_encoder)
        modules = [self.unet, self.text_encoder] if train_text_encoder else [self.unet]
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def trained_forward(self, module, *inputs):
        """A prepared (trained) module's forward: under autocast with mixed precision."""
        import torch

        if self.mixed_precision == "no":
            return module(*inputs, return_dict=False)[0]
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.autocast(device_type, dtype=self.weight_dtype):
            output = module(*inputs, return_dict=False)[0]
        return output.float()

    def step(self, phases):
        """One optimizer step; returns the loss and adds each part's seconds to `phases`."""
        import torch
        import torch.nn.functional as F

        lap = Lap(self.device)
        model_input = self.vae.encode(self.pixel_values).latent_dist.sample()
        model_input = model_input * self.vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        train_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, train_steps, (1,), device=model_input.device).long()
        noisy = self.noise_scheduler.add_noise(model_input, noise, timesteps)
        lap.add_to(phases, PHASES[0])
        if self.train_text_encoder:
            hidden = self.trained_forward(self.text_encoder, self.input_ids)
        else:
            hidden = self.text_encoder(self.input_ids, return_dict=False)[0]
        lap.add_to(phases, PHASES[1])
        prediction = self.trained_forward(self.unet, noisy, timesteps, hidden)
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        lap.add_to(phases, PHASES[2])
        loss.backward()
        lap.add_to(phases, PHASES[3])
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        lap.add_to(phases, PHASES[4])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        value = loss.item()
        lap.add_to(phases, PHASES[5])
        return value


# The parts of a step timed separately (same names as src/bench/dreambooth.rs).
PHASES = [
    "vae_encode_and_noise",
    "text_encoder",
    "unet_forward_and_loss",
    "backward",
    "clip_grad_norm",
    "optimizer_step",
]


class Lap:
    """A stopwatch whose laps end once the device has finished the queued work."""

    def __init__(self, device):
        self.device = device
        self.last = (time.perf_counter(), time.process_time())

    def add_to(self, phases, phase):
        """Adds (wall, CPU) seconds since the previous lap to phases[phase]."""
        synchronize(self.device)
        now = (time.perf_counter(), time.process_time())
        wall, cpu = phases.get(phase, (0.0, 0.0))
        phases[phase] = (wall + now[0] - self.last[0], cpu + now[1] - self.last[1])
        self.last = now


def dreambooth(args):
    import torch

    started = time.perf_counter()
    trainer = DreamBoothTrainer(args)
    load_s = time.perf_counter() - started
    torch.manual_seed(0)
    losses = [trainer.step({}) for _ in range(DREAMBOOTH_WARMUP_STEPS)]
    step_times, step_cpu_times = [], []
    phases = {}
    for _ in range(args.steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        losses.append(trainer.step(phases))
        step_times.append(time.perf_counter() - started)
        step_cpu_times.append(time.process_time() - started_cpu)
    record = {
        "bench": "dreambooth",
        "impl": "diffusers",
        "model": args.label,
        "device": args.device,
        "dtype": "bf16 autocast" if args.mixed_precision == "bf16" else "Float",
        "resolution": args.resolution,
        "batch": 1,
        "train_text_encoder": args.train_text_encoder,
        "mixed_precision": args.mixed_precision,
        "lora_rank": args.lora_rank,
        "steps": args.steps,
        "threads": args.threads,
        "load_s": round(load_s, 4),
        "step_s": round(sum(step_times) / len(step_times), 4),
        "step_min_s": round(min(step_times), 4),
        "step_cpu_s": round(sum(step_cpu_times) / len(step_cpu_times), 4),
        "step_times_s": [round(t, 4) for t in step_times],
        "trainable_params": sum(p.numel() for p in trainer.params),
        "losses": losses,
        "phases_s": {phase: round(t[0] / args.steps, 4) for phase, t in sorted(phases.items())},
        "phases_cpu_s": {phase: round(t[1] / args.steps, 4) for phase, t in sorted(phases.items())},
        "peak_rss_mib": round(peak_rss_mib(), 4),
    }
    if args.device.startswith("cuda"):
        record["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 4)
    return record


def make_scaled(args):
    import torch
    from diffusers import UNet2DConditionModel

    if os.path.exists(os.path.join(args.out, "unet")):
        return {"bench": "make-scaled", "out": args.out, "reused": True}
    with open(os.path.join(args.source, "unet", "config.json")) as file:
        config = json.load(file)
    config["block_out_channels"] = [int(c * args.width_scale) for c in config["block_out_channels"]]
    for channels in config["block_out_channels"]:
        if channels % config.get("norm_num_groups", 32):
            sys.exit(f"--width-scale {args.width_scale}: {channels} channels do not divide into norm groups")
    os.makedirs(args.out, exist_ok=True)
    for entry in ("model_index.json", "text_encoder", "tokenizer", "scheduler", "vae"):
        link = os.path.join(args.out, entry)
        if not os.path.lexists(link):
            # Relative, so the pair of folders can move together (e.g. a new checkout).
            target = os.path.relpath(os.path.join(args.source, entry), args.out)
            os.symlink(target, link)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel.from_config(config)
    unet.save_pretrained(os.path.join(args.out, "unet"))
    parameters = sum(p.numel() for p in unet.parameters())
    return {"bench": "make-scaled", "out": args.out, "unet_parameters": parameters}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    def common(verb):
        verb.add_argument("--model", required=True, help="a diffusers folder")
        verb.add_argument("--label", default="model", help="name of the model in the report")
        verb.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
        verb.add_argument("--device", default="cpu", help="cpu or cuda")

    sample = verbs.add_parser("txt2img")
    common(sample)
    sample.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    sample.add_argument("--batch", type=int, default=1)
    sample.add_argument("--steps", type=int, default=10, help="DDIM steps of the timed run (>= 2)")
    sample.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run (0: none)")
    sample.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")

    train = verbs.add_parser("dreambooth")
    common(train)
    train.add_argument("--resolution", type=int, default=512)
    train.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    train.add_argument("--train-text-encoder", action="store_true")
    train.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    train.add_argument("--lora-rank", type=int, default=None,
                       help="train LoRA adapters of this rank (train_dreambooth_lora.py) instead of all weights")

    scaled = verbs.add_parser("make-scaled")
    scaled.add_argument("--source", required=True, help="an SD diffusers folder (sd15)")
    scaled.add_argument("--out", required=True)
    scaled.add_argument("--width-scale", type=float, default=0.5)
    scaled.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.verb == "txt2img" and args.steps < 2:
        parser.error("--steps must be at least 2 (the step rate is measured between callbacks)")
    if args.verb == "dreambooth" and args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv):
    args = parse_args(argv)
    if args.verb == "make-scaled":
        print(json.dumps(make_scaled(args)))
        return
    pin_threads(args.threads)
    run = {"txt2img": txt2img, "dreambooth": dreambooth}[args.verb]
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
