//! `dreampipe cache ls | gc | verify`.
use super::Context;
use crate::cache::gc::{GcPolicy, GcReport, gc};
use crate::cache::hash::HashMemo;
use crate::cache::store::Store;
use crate::cache::verify::verify;
use crate::pipeline::{LoadOptions, load};
use crate::plan::dirty::{Status, assess};
use crate::plan::graph::Plan;
use clap::{Args, Subcommand};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: CacheAction,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// List results: key, stage, size, age.
    Ls,
    /// Remove old results; never those the given pipelines reference.
    Gc {
        /// Pipelines whose current results must be kept.
        pipelines: Vec<PathBuf>,
        /// Keep the N newest results of each stage.
        #[arg(long)]
        keep_last: Option<usize>,
        /// Remove the oldest results until the store fits, e.g. `10G`, `500M`.
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
        /// Also remove every kept training state (`states/`: what lets a longer run continue
        /// a cached one; the results stay).
        #[arg(long)]
        drop_states: bool,
    },
    /// Rehash everything; quarantine what is corrupt.
    Verify,
}

/// `10G`, `500M`, `64K`, `123` (bytes; powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let upper = text.trim().to_ascii_uppercase();
    let (digits, unit) = upper.split_at(
        upper
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(upper.len()),
    );
    let factor: u64 = match unit.trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}`: use a number of bytes with an optional K, M, G or T suffix"
            ));
        }
    };
    digits
        .parse::<u64>()
        .map(|n| n.saturating_mul(factor))
        .map_err(|_| format!("`{text}`: expected a size such as 10G or 500M"))
}

pub fn run(context: &Context, args: &CacheArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open(&context.cache_root)?;
    match &args.action {
        CacheAction::Ls => list(&store),
        CacheAction::Gc {
            pipelines,
            keep_last,
            max_size,
            drop_states,
        } => {
            if keep_last.is_none() && max_size.is_none() && !drop_states {
                anyhow::bail!("cache gc: give --keep-last N, --max-size SIZE and/or --drop-states");
            }
            let protected = referenced_keys(context, &store, pipelines)?;
            let policy = GcPolicy {
                keep_last: *keep_last,
                max_size: *max_size,
                protected,
                drop_states: *drop_states,
            };
            print_gc_report(&gc(&store, &policy)?);
        }
        CacheAction::Verify => return verify_store(&store),
    }
    Ok(ExitCode::SUCCESS)
}

/// `cache ls`: one line per result (key, stage, size, age, kept training state).
fn list(store: &Store) {
    let now = crate::cache::store::now_unix();
    for record in store.results() {
        let state = store.state_dir(&record.key);
        let state = match state.is_dir() {
            true => format!("  + state {} bytes", crate::cache::gc::folder_bytes(&state)),
            false => String::new(),
        };
        println!(
            "{}  {:30} {:>10} bytes  {:>6}s ago{state}",
            record.key.get(..16).unwrap_or(&record.key),
            record.stage_id,
            record.size_bytes,
            now.saturating_sub(record.created_unix)
        );
    }
}

/// What `cache gc` removed (lines for what it did not touch are left out).
fn print_gc_report(report: &GcReport) {
    println!(
        "removed {} result(s), {} object(s) ({} bytes), {} stale staging folder(s)",
        report.removed_results.len(),
        report.removed_objects,
        report.freed_bytes,
        report.removed_staging
    );
    if report.removed_job_files > 0 {
        println!(
            "removed {} Slurm job/log folder(s) of finished work",
            report.removed_job_files
        );
    }
    if report.removed_states > 0 {
        println!(
            "removed {} training state(s) ({} bytes)",
            report.removed_states, report.freed_state_bytes
        );
    }
    if report.removed_shared > 0 {
        println!(
            "removed {} shared memo file(s) ({} bytes)",
            report.removed_shared, report.freed_shared_bytes
        );
    }
    if !report.in_use.is_empty() {
        println!(
            "kept {} result(s) in use by a running stage",
            report.in_use.len()
        );
    }
}

/// `cache verify`: each problem, then the counts; exit code 1 when there is a problem.
fn verify_store(store: &Store) -> anyhow::Result<ExitCode> {
    let report = verify(store)?;
    for problem in &report.problems {
        println!("{problem}");
    }
    println!(
        "checked {} object(s) and {} result(s): {} problem(s)",
        report.objects_checked,
        report.results_checked,
        report.problems.len()
    );
    Ok(match report.problems.is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// Keys of the fresh stages of each pipeline (what a run would reuse).
fn referenced_keys(
    context: &Context,
    store: &Store,
    pipelines: &[PathBuf],
) -> anyhow::Result<BTreeSet<String>> {
    let memo = HashMemo::load(&store.memo_path());
    let mut keys = BTreeSet::new();
    for path in pipelines {
        let options = LoadOptions::new(context.registry.clone());
        let plan = Plan::new(load(path, &options)?);
        let all = vec![true; plan.len()];
        for status in assess(
            &plan,
            store,
            &memo,
            context.device,
            &all,
            &vec![false; plan.len()],
        )? {
            if let Status::Fresh { key, .. } = status {
                keys.insert(key);
            }
        }
    }
    Ok(keys)
}
