//! `dreampipe bench-cache --dir DIR` (hidden): the cache's benchmark figures. blake3 throughput
//! on a large file (first hash with the file in the page cache, then the memoized rerun), the
//! time to load + plan a 1,000-stage sweep, and the wall time of a no-op rerun of a pipeline
//! whose model folder holds several GB (the pipelines come with the kinds: the registry's
//! [`PipelineTemplates`]). Everything it creates under DIR is deleted at the end.
use super::Context;
use crate::cache::hash::{HashMemo, hash_file_uncached};
use crate::cache::store::Store;
use crate::pipeline::{LoadOptions, load_str};
use crate::plan::dirty::assess;
use crate::plan::graph::Plan;
use crate::stages::templates::PipelineTemplates;
use clap::Args;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

/// Bytes per write while generating benchmark files.
const CHUNK_BYTES: usize = 16 << 20;
/// How far file mtimes are moved into the past so the memo does not treat them as racy.
const BACKDATE: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Scratch folder (must have room for the files; removed afterwards).
    #[arg(long)]
    pub dir: std::path::PathBuf,
    /// Size of the single-file hash benchmark, in GiB.
    #[arg(long, default_value_t = 2)]
    pub file_gib: u64,
    /// Size of the model folder for the no-op rerun, in GiB (spread over 4 files).
    #[arg(long, default_value_t = 4)]
    pub model_gib: u64,
    /// Stages in the sweep to plan.
    #[arg(long, default_value_t = 1000)]
    pub sweep: usize,
}

pub fn run(context: &Context, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let root = args.dir.join("dreampipe-bench");
    std::fs::create_dir_all(&root)?;
    let result = bench_all(context, args, &root);
    std::fs::remove_dir_all(&root)?;
    result.map(|()| ExitCode::SUCCESS)
}

fn bench_all(context: &Context, args: &BenchArgs, root: &Path) -> anyhow::Result<()> {
    let big = root.join("big.bin");
    write_file(&big, args.file_gib * GIB)?;
    let started = Instant::now();
    hash_file_uncached(&big, args.file_gib * GIB)?;
    let cold = started.elapsed();
    let memo = HashMemo::in_memory();
    memo.hash_file(&big)?;
    let started = Instant::now();
    memo.hash_file(&big)?;
    let memoized = started.elapsed();
    let gb = (args.file_gib * GIB) as f64 / 1e9;
    println!(
        "blake3 {} GiB file (page cache): {:.2} s, {:.2} GB/s",
        args.file_gib,
        cold.as_secs_f64(),
        gb / cold.as_secs_f64()
    );
    println!(
        "blake3 {} GiB file, memoized rerun: {:.3} ms",
        args.file_gib,
        memoized.as_secs_f64() * 1e3
    );
    std::fs::remove_file(&big)?;
    bench_plan(context, args.sweep, root)?;
    bench_noop_rerun(context, args.model_gib, root)
}

fn bench_plan(context: &Context, stages: usize, root: &Path) -> anyhow::Result<()> {
    let text = (templates(context)?.bench_sweep)(stages);
    let started = Instant::now();
    let pipeline = load_str(
        &text,
        &root.join("sweep.yaml"),
        root,
        &LoadOptions::new(context.registry.clone()),
    )?;
    let plan = Plan::new(pipeline);
    let loaded = started.elapsed();
    let store = Store::open(&root.join("plan-cache"))?;
    let all = vec![true; plan.len()];
    assess(
        &plan,
        &store,
        &HashMemo::in_memory(),
        context.device,
        &all,
        &vec![false; plan.len()],
    )?;
    println!(
        "plan of a {}-stage sweep: load+validate+expand {:.1} ms, with cache lookups {:.1} ms",
        plan.len(),
        loaded.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn bench_noop_rerun(context: &Context, model_gib: u64, root: &Path) -> anyhow::Result<()> {
    let model = root.join("model");
    std::fs::create_dir_all(&model)?;
    for part in 0..4 {
        write_file(
            &model.join(format!("part-{part}.safetensors")),
            model_gib * GIB / 4,
        )?;
    }
    std::fs::write(root.join("p.yaml"), templates(context)?.bench_noop)?;
    let run = || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let status = std::process::Command::new(std::env::current_exe()?)
            .current_dir(root)
            .args([
                "--device", "cpu", "--cache", "cache", "run", "p.yaml", "--plain",
            ])
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "the benchmark pipeline failed");
        Ok(started.elapsed())
    };
    let first = run()?;
    let second = run()?;
    let in_process = noop_plan_in_process(context, root)?;
    let startup = {
        let started = Instant::now();
        std::process::Command::new(std::env::current_exe()?)
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .status()?;
        started.elapsed()
    };
    println!(
        "pipeline with a {model_gib} GiB model folder: first run {:.2} s; no-op rerun {:.1} ms whole process \
         (of which process start-up {:.1} ms); in-process load+hash+plan {:.1} ms",
        first.as_secs_f64(),
        second.as_secs_f64() * 1e3,
        startup.as_secs_f64() * 1e3,
        in_process.as_secs_f64() * 1e3
    );
    Ok(())
}

/// What a no-op `run` does before finding everything fresh: load the memo, validate, hash the
/// inputs (memoized), look up the keys.
fn noop_plan_in_process(context: &Context, root: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let store = Store::open(&root.join("cache"))?;
    let memo = HashMemo::load(&store.memo_path());
    let plan = Plan::new(crate::pipeline::load(
        &root.join("p.yaml"),
        &LoadOptions::new(context.registry.clone()),
    )?);
    let statuses = assess(
        &plan,
        &store,
        &memo,
        crate::device::Device::Cpu,
        &[true],
        &[false],
    )?;
    anyhow::ensure!(
        matches!(statuses[0], crate::plan::dirty::Status::Fresh { .. }),
        "the benchmark stage should be fresh"
    );
    Ok(started.elapsed())
}

/// The benchmark pipelines, registered with the kinds they name.
fn templates(context: &Context) -> anyhow::Result<&PipelineTemplates> {
    (context.registry.templates())
        .ok_or_else(|| anyhow::anyhow!("no benchmark pipelines are registered"))
}

/// Writes `size` bytes of varied content and backdates its mtime.
fn write_file(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ size;
    for byte in chunk.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let mut file = std::fs::File::create(path)?;
    let mut written = 0u64;
    while written < size {
        let n = (size - written).min(CHUNK_BYTES as u64) as usize;
        chunk[0] = chunk[0].wrapping_add(1);
        file.write_all(&chunk[..n])?;
        written += n as u64;
    }
    file.set_modified(SystemTime::now() - BACKDATE)?;
    Ok(())
}
