#!/usr/bin/env python3
"""Joins the JSON lines of `dreampipe bench ...` and `diffusers_bench.py` (one file, any order)
into a markdown table. Ratios are dreampipe / diffusers for times and memory (below 1: dreampipe
is faster / smaller), so the targets read directly: <= 0.9 tiny model, <= 1.0 sd15 sampling.

Usage: report.py RESULTS.jsonl [--title TEXT] [--note TEXT]...
Standard library only (runs with any python3).
"""
import argparse
import json
import sys

TXT2IMG_KEY = ("model", "device", "dtype", "size", "batch", "steps", "threads")
DREAMBOOTH_KEY = ("model", "device", "dtype", "resolution", "train_text_encoder", "lora_rank", "steps",
                  "threads")


def load(path):
    records = []
    with open(path) as file:
        for number, line in enumerate(file, 1):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                sys.exit(f"{path}:{number}: not a JSON record ({error})")
    return records


# The figure that picks the best of several runs of one case (BENCH_REPEAT): CPU time per
# step, the least disturbed by other load.
BEST_BY = {"txt2img": "unet_step_cpu_s", "dreambooth": "step_cpu_s"}


def pair_up(records, bench, key_fields):
    """{key: {impl: record}} for one bench kind, in first-seen order. When a case ran several
    times, each implementation's fastest run (lowest CPU s/step) stands for it, with the number
    of runs in its "runs_of_case" field."""
    pairs = {}
    best_by = BEST_BY.get(bench)
    for record in records:
        if record.get("bench") != bench:
            continue
        key = tuple(record.get(field) for field in key_fields)
        by_impl = pairs.setdefault(key, {})
        previous = by_impl.get(record["impl"])
        runs = 1 + (previous["runs_of_case"] if previous else 0)
        if previous is None or (record.get(best_by) or 0) < (previous.get(best_by) or 0):
            by_impl[record["impl"]] = dict(record)
        by_impl[record["impl"]]["runs_of_case"] = runs
    return pairs


def repeat_note(records):
    """A line saying how many runs each case had, when that was more than one."""
    runs = set()
    for bench, key_fields in (("txt2img", TXT2IMG_KEY), ("dreambooth", DREAMBOOTH_KEY)):
        for by_impl in pair_up(records, bench, key_fields).values():
            runs.update(record["runs_of_case"] for record in by_impl.values())
    if runs and max(runs) > 1:
        counts = ", ".join(map(str, sorted(runs)))
        return [f"- each case ran {counts} times per side, alternating; each side's fastest run (lowest CPU s/step) is shown."]
    return []


def number(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def ratio(mine, theirs):
    if mine is None or theirs is None or theirs == 0:
        return "—"
    return f"**{mine / theirs:.2f}**"


def field(record, name):
    return None if record is None else record.get(name)


def triple(mine, theirs, name, digits=3):
    """`dreampipe | diffusers | ratio` cells for one field."""
    a, b = field(mine, name), field(theirs, name)
    return f"| {number(a, digits)} | {number(b, digits)} | {ratio(a, b)} "


def txt2img_table(records):
    pairs = pair_up(records, "txt2img", TXT2IMG_KEY)
    if not pairs:
        return []
    lines = [
        "### txt2img (DDIM, CFG 7.5; one timed generation after an untimed warm-up generation)",
        "",
        "Each metric: dreampipe | diffusers | ratio. UNet step = one CFG step (UNet on 2 × batch).",
        "",
        "| model | device | dtype | size | batch | steps "
        "| UNet s/step (wall) | | ratio | UNet CPU s/step | | ratio | fastest step (wall) | | ratio "
        "| UNet steps/s | | e2e s/image (wall) | | ratio | e2e CPU s/image | | ratio "
        "| peak RSS MiB | | ratio |",
        "|---|---|---|---|---|---" + "|---" * 23 + "|",
    ]
    for key, by_impl in pairs.items():
        mine, theirs = by_impl.get("dreampipe"), by_impl.get("diffusers")
        model, device, dtype, size, batch, steps, _ = key
        lines.append(
            f"| {model} | {device} | {dtype} | {size} | {batch} | {steps} "
            + triple(mine, theirs, "unet_step_s")
            + triple(mine, theirs, "unet_step_cpu_s")
            + triple(mine, theirs, "unet_step_min_s")
            + f"| {number(field(mine, 'unet_steps_per_s'), 2)} | {number(field(theirs, 'unet_steps_per_s'), 2)} "
            + triple(mine, theirs, "e2e_s_per_image")
            + triple(mine, theirs, "e2e_cpu_s_per_image")
            + triple(mine, theirs, "peak_rss_mib", 0)
            + "|"
        )
    return lines + [""]


def dreambooth_table(records):
    pairs = pair_up(records, "dreambooth", DREAMBOOTH_KEY)
    if not pairs:
        return []
    lines = [
        "### DreamBooth optimizer step (batch 1, AdamW, clip_grad_norm 1.0; after 1 warm-up step)",
        "",
        "Each metric: dreampipe | diffusers | ratio.",
        "",
        "| model | device | dtype | resolution | trains | trainable params | timed steps "
        "| s/step (wall) | | ratio | CPU s/step | | ratio | fastest step (wall) | | ratio "
        "| peak memory MiB | | ratio |",
        "|---|---|---|---|---|---|---" + "|---" * 12 + "|",
    ]
    for key, by_impl in pairs.items():
        mine, theirs = by_impl.get("dreampipe"), by_impl.get("diffusers")
        model, device, dtype, resolution, train_te, lora_rank, steps, _ = key
        trains = "UNet + text encoder" if train_te else "UNet"
        if lora_rank:
            trains = f"LoRA r{lora_rank} on {trains}"
        params = field(mine, "trainable_params") or field(theirs, "trainable_params") or 0
        memory = "peak_memory_mib" if field(mine, "peak_memory_mib") is not None else "peak_rss_mib"
        lines.append(
            f"| {model} | {device} | {dtype} | {resolution} | {trains} | {params / 1e6:.1f} M | {steps} "
            + triple(mine, theirs, "step_s")
            + triple(mine, theirs, "step_cpu_s")
            + triple(mine, theirs, "step_min_s")
            + triple(mine, theirs, memory, 0)
            + "|"
        )
    return lines + [""]


PHASES = [
    "vae_encode_and_noise",
    "text_encoder",
    "unet_forward_and_loss",
    "backward",
    "clip_grad_norm",
    "optimizer_step",
]


def phases_table(records):
    """Where a DreamBooth step's time goes: mean seconds per phase, both sides (CPU seconds on
    the CPU, where they are steadier; wall seconds on a GPU)."""
    pairs = pair_up(records, "dreambooth", DREAMBOOTH_KEY)
    rows = []
    for key, by_impl in pairs.items():
        name = "phases_cpu_s" if key[1] == "cpu" else "phases_s"
        mine, theirs = field(by_impl.get("dreampipe"), name), field(by_impl.get("diffusers"), name)
        if not mine or not theirs:
            continue
        model, _, _, resolution, train_te, lora_rank, _, _ = key
        trains = "UNet + TE" if train_te else "UNet"
        if lora_rank:
            trains = f"LoRA r{lora_rank} {trains}"
        cells = [f"{number(mine.get(p))} / {number(theirs.get(p))}" for p in PHASES]
        rows.append(f"| {model} | {resolution} | {trains} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "### Where a DreamBooth step's time goes (mean s per step, dreampipe / diffusers; CPU seconds on the CPU, wall on a GPU)",
        "",
        "| model | resolution | trains | " + " | ".join(PHASES) + " |",
        "|---|---|---|" + "---|" * len(PHASES),
        *rows,
        "",
    ]


def runner_table(records):
    rows = [r for r in records if r.get("bench") == "runner"]
    if not rows:
        return []
    lines = [
        "### Runner overhead (dreampipe only: diffusers has no pipeline runner)",
        "",
        "| what | runs | mean s | min s |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['what']} | {row['runs']} | {number(row['mean_s'])} | {number(row['min_s'])} |")
    return lines + [""]


def versions(records):
    found = sorted({(r["impl"], r.get("versions", "")) for r in records if r.get("versions")})
    return [f"- {impl}: {text}" for impl, text in found]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--title", default="dreampipe vs diffusers")
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    records = load(args.results)
    threads = sorted({r["threads"] for r in records if "threads" in r})
    out = [f"## {args.title}", ""]
    out += [f"- {note}" for note in args.note]
    out.append(
        f"- Intra-op threads pinned to {', '.join(map(str, threads)) or '?'} on both sides "
        "(libtorch `set_num_threads` / `torch.set_num_threads`, inter-op 1, OMP_NUM_THREADS set)."
    )
    out.append("- ratio = dreampipe / diffusers (time or memory; < 1 means dreampipe is faster or smaller).")
    out.append(
        "- wall s/step is the mean over the timed steps, fastest step their minimum; CPU s/step is the "
        "process's user+system CPU time per step (getrusage / time.process_time), which other load "
        "on a shared machine disturbs far less than wall time."
    )
    out += repeat_note(records)
    out += versions(records)
    out.append("")
    out += txt2img_table(records) + dreambooth_table(records) + phases_table(records) + runner_table(records)
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
