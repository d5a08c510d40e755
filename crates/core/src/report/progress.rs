//! Live progress: one indicatif bar per running stage (step/total, the stage's metric, it/s,
//! ETA) and a line per cached/finished stage on a terminal; plain log lines otherwise.
use crate::exec::events::Event;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use tokio::sync::mpsc::UnboundedReceiver;

/// Plain mode prints a progress line each time a stage passes another tenth of its steps.
const PLAIN_PROGRESS_BUCKETS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Bars,
    Plain,
    Quiet,
    /// One JSON object per event on stdout (`--message-format json`).
    Json,
}

/// Bars when stdout is a terminal, plain lines otherwise.
pub fn style_for_stdout() -> Style {
    if std::io::stdout().is_terminal() {
        Style::Bars
    } else {
        Style::Plain
    }
}

/// Consumes events until the sender is dropped.
pub async fn report(mut events: UnboundedReceiver<Event>, style: Style) {
    match style {
        Style::Quiet => while events.recv().await.is_some() {},
        Style::Plain => {
            let mut buckets: HashMap<String, u64> = HashMap::new();
            while let Some(event) = events.recv().await {
                match (&event, plain_line(&event, &mut buckets)) {
                    (Event::Warning { .. }, Some(line)) => eprintln!("{line}"),
                    (_, Some(line)) => println!("{line}"),
                    (_, None) => {}
                }
            }
        }
        Style::Bars => bars(events).await,
        Style::Json => {
            while let Some(event) = events.recv().await {
                println!("{}", json_line(&event));
            }
        }
    }
}

/// An event as one line of JSON: `{"schema": 1, "event": "started", "id": …, …}`.
pub fn json_line(event: &impl serde::Serialize) -> String {
    let mut value = serde_json::to_value(event).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "schema".to_string(),
            crate::exec::events::EVENT_SCHEMA_VERSION.into(),
        );
    }
    value.to_string()
}

/// The plain text for an event (progress throttled to tenths).
pub fn plain_line(event: &Event, buckets: &mut HashMap<String, u64>) -> Option<String> {
    Some(match event {
        Event::RunStarted { pipeline, stages } => format!("run {pipeline}: {stages} stage(s)"),
        Event::Cached { id, output, .. } => format!("[cached]  {id} -> {}", output.display()),
        Event::Served { id, from, .. } => format!("[served]  {id}: {from}"),
        Event::Waiting { id, key } => format!(
            "[waiting] {id}: another run is computing key {}; will reuse its result",
            &key[..12.min(key.len())]
        ),
        Event::Started { id, key } => format!("[run]     {id} (key {})", &key[..12.min(key.len())]),
        Event::Submitted {
            id,
            job_id,
            adopted: false,
        } => format!("[slurm]   {id}: submitted as job {job_id}"),
        Event::Submitted {
            id,
            job_id,
            adopted: true,
        } => format!("[slurm]   {id}: waiting for job {job_id} (submitted by an earlier run)"),
        Event::Progress {
            id,
            step,
            total,
            metric,
        } => {
            let bucket = step.saturating_mul(PLAIN_PROGRESS_BUCKETS) / (*total).max(1);
            if buckets.insert(id.clone(), bucket) == Some(bucket) {
                return None;
            }
            let metric = metric
                .as_ref()
                .map(|(name, value)| format!(" {name}={value:.4}"))
                .unwrap_or_default();
            format!("[step]    {id} {step}/{total}{metric}")
        }
        Event::Finished { id, seconds, .. } => format!("[done]    {id} in {seconds:.2}s"),
        Event::Failed { id, error, log } => {
            let log = log
                .as_ref()
                .map(|l| format!(" (log: {})", l.display()))
                .unwrap_or_default();
            format!("[FAILED]  {id}: {error}{log}")
        }
        Event::Skipped { id, reason } => format!("[skipped] {id}: {reason}"),
        Event::Warning { id, message } => format!("warning: {id}: {message}"),
    })
}

async fn bars(mut events: UnboundedReceiver<Event>) {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{spinner} {prefix:24} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    // Until a stage reports steps (a `command` never does), a spinner with the elapsed time.
    let spinner = ProgressStyle::with_template("{spinner} {prefix:24} running {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut running: HashMap<String, ProgressBar> = HashMap::new();
    let mut ignored = HashMap::new();
    while let Some(event) = events.recv().await {
        match &event {
            Event::Started { id, .. } => {
                let bar = multi.add(
                    ProgressBar::new(0)
                        .with_style(spinner.clone())
                        .with_prefix(id.clone()),
                );
                bar.enable_steady_tick(std::time::Duration::from_millis(200));
                running.insert(id.clone(), bar);
            }
            Event::Progress {
                id,
                step,
                total,
                metric,
            } => {
                if let Some(bar) = running.get(id) {
                    if bar.length() == Some(0) {
                        bar.set_style(style.clone());
                    }
                    bar.set_length(*total);
                    bar.set_position(*step);
                    if let Some((name, value)) = metric {
                        bar.set_message(format!("{name}={value:.4}"));
                    }
                }
            }
            _ => {
                let id = match &event {
                    Event::Finished { id, .. }
                    | Event::Failed { id, .. }
                    | Event::Skipped { id, .. } => Some(id.clone()),
                    _ => None,
                };
                if let Some(bar) = id.and_then(|id| running.remove(&id)) {
                    bar.finish_and_clear();
                    multi.remove(&bar);
                }
                if let Some(line) = plain_line(&event, &mut ignored) {
                    let _ = multi.println(line);
                }
            }
        }
    }
}
