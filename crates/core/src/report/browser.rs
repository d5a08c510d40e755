//! Opening a report in headless Chromium, with no extra crates: `--dump-dom` after the page's
//! load event (a virtual-time budget lets it finish), reading the markers the page's own verify
//! script put on `<html>` (every image decoded, no script/resource error), plus any console
//! message in Chromium's stderr log (`--enable-logging=stderr`: lines with `:CONSOLE`; the report
//! never logs, so every console line is a finding). Also takes screenshots.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ReportError;

/// Environment variable naming the browser binary, overriding the search.
pub const CHROMIUM_ENV: &str = "DREAMPIPE_CHROMIUM";
/// Binaries looked up in PATH, in order (Debian's package installs `chromium`).
const CHROMIUM_NAMES: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];
/// Virtual time the page gets to load before the DOM is dumped (ms; local files load in far less).
const VIRTUAL_TIME_BUDGET_MS: u32 = 5000;
/// Wall-clock limit for one browser run; a healthy run takes about a second.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
/// Flags for a quiet, isolated, offline headless run (no sandbox: CI runs as root in a container).
const HEADLESS_FLAGS: [&str; 10] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
];

/// What the browser saw.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BrowserCheck {
    /// The page's load handler ran and recorded its findings.
    pub verified: bool,
    pub images_checked: usize,
    /// `data-name` (source path) of each image that did not decode.
    pub broken_images: Vec<String>,
    /// Script errors and failed resource loads the page recorded.
    pub page_errors: Vec<String>,
    /// Console messages from Chromium's log.
    pub console_messages: Vec<String>,
}

impl BrowserCheck {
    /// Loaded, verified, every image decoded, nothing logged.
    pub fn is_clean(&self) -> bool {
        self.verified
            && self.broken_images.is_empty()
            && self.page_errors.is_empty()
            && self.console_messages.is_empty()
    }
}

/// The Chromium binary: `$DREAMPIPE_CHROMIUM`, else the first of `chromium`, `chromium-browser`,
/// `google-chrome` found in PATH.
pub fn find_chromium() -> Result<PathBuf, ReportError> {
    find_chromium_in(
        std::env::var_os(CHROMIUM_ENV),
        std::env::var_os("PATH").unwrap_or_default(),
    )
}

/// [`find_chromium`] with the override and the search path given explicitly.
fn find_chromium_in(
    override_path: Option<std::ffi::OsString>,
    search_path: std::ffi::OsString,
) -> Result<PathBuf, ReportError> {
    if let Some(explicit) = override_path {
        let path = PathBuf::from(explicit);
        if path.is_file() {
            return Ok(path);
        }
        return Err(ReportError::BrowserMissing {
            tried: format!("{CHROMIUM_ENV}={}", path.display()),
        });
    }
    for name in CHROMIUM_NAMES {
        if let Some(found) = std::env::split_paths(&search_path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
        {
            return Ok(found);
        }
    }
    Err(ReportError::BrowserMissing {
        tried: format!("{} in PATH", CHROMIUM_NAMES.join(", ")),
    })
}

/// Loads `page` and reports what its verify script and the console said.
pub fn check_page(page: &Path) -> Result<BrowserCheck, ReportError> {
    let url = file_url(page)?;
    let budget = format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}");
    let run = run_chromium(
        page,
        &[
            "--enable-logging=stderr",
            "--v=0",
            &budget,
            "--dump-dom",
            &url,
        ],
    )?;
    let markers = html_element_attributes(&run.stdout);
    let split = |name: &str| -> Vec<String> {
        markers
            .get(name)
            .map(|v| {
                v.split(" | ")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(BrowserCheck {
        verified: markers.contains_key("data-images-ok"),
        images_checked: markers
            .get("data-images-checked")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        broken_images: split("data-images-broken"),
        page_errors: split("data-page-errors"),
        console_messages: console_lines(&run.stderr),
    })
}

/// Renders `page` into a PNG screenshot of `width`×`height` CSS pixels.
pub fn screenshot(page: &Path, png: &Path, width: u32, height: u32) -> Result<(), ReportError> {
    let url = file_url(page)?;
    let target = std::path::absolute(png)
        .map_err(|e| browser_error(page, format!("bad screenshot path {}: {e}", png.display())))?;
    let screenshot = format!("--screenshot={}", target.display());
    let size = format!("--window-size={width},{height}");
    let budget = format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}");
    run_chromium(page, &[&budget, &size, &screenshot, &url])?;
    if !target.is_file() {
        return Err(browser_error(
            page,
            format!(
                "Chromium exited without writing the screenshot {}",
                target.display()
            ),
        ));
    }
    Ok(())
}

struct BrowserRun {
    stdout: String,
    stderr: String,
}

/// Runs Chromium with a throw-away profile and a wall-clock limit.
fn run_chromium(page: &Path, args: &[&str]) -> Result<BrowserRun, ReportError> {
    let chromium = find_chromium()?;
    let profile = tempfile::tempdir()
        .map_err(|e| browser_error(page, format!("cannot create a browser profile folder: {e}")))?;
    let child = Command::new(&chromium)
        .args(HEADLESS_FLAGS)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| browser_error(page, format!("cannot start {}: {e}", chromium.display())))?;
    wait_with_timeout(child, page)
}

/// Collects output on reader threads (so full pipes cannot stall the browser) and kills the
/// browser if it outlives [`BROWSER_TIMEOUT`].
fn wait_with_timeout(mut child: Child, page: &Path) -> Result<BrowserRun, ReportError> {
    let stdout = child.stdout.take().map(spawn_reader);
    let stderr = child.stderr.take().map(spawn_reader);
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > BROWSER_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(browser_error(
                    page,
                    format!(
                        "no result within {} s; the browser was stopped",
                        BROWSER_TIMEOUT.as_secs()
                    ),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(browser_error(
                    page,
                    format!("cannot wait for the browser: {e}"),
                ));
            }
        }
    };
    let collect = |reader: Option<std::thread::JoinHandle<String>>| {
        reader.and_then(|r| r.join().ok()).unwrap_or_default()
    };
    let run = BrowserRun {
        stdout: collect(stdout),
        stderr: collect(stderr),
    };
    if !status.success() {
        let tail: String = run
            .stderr
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" / ");
        return Err(browser_error(
            page,
            format!("the browser exited with {status}: {tail}"),
        ));
    }
    Ok(run)
}

fn spawn_reader(
    mut source: impl std::io::Read + Send + 'static,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = source.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// `file://` URL of `page` (absolute, percent-encoding bytes that are not URL-safe).
pub fn file_url(page: &Path) -> Result<String, ReportError> {
    let absolute = std::path::absolute(page)
        .map_err(|e| browser_error(page, format!("cannot make the path absolute: {e}")))?;
    let mut url = String::from("file://");
    for byte in absolute.to_string_lossy().bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            url.push(char::from(byte));
        } else {
            url.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(url)
}

/// Attributes of the dumped `<html>` start tag, entity-decoded.
fn html_element_attributes(dom: &str) -> std::collections::HashMap<String, String> {
    let start = dom.find("<html").unwrap_or(dom.len());
    let end = dom[start..].find('>').map_or(dom.len(), |i| start + i);
    let attribute = regex::Regex::new(r#"([a-zA-Z-]+)="([^"]*)""#).ok();
    let mut found = std::collections::HashMap::new();
    if let Some(attribute) = attribute {
        for capture in attribute.captures_iter(&dom[start..end]) {
            found.insert(capture[1].to_string(), decode_entities(&capture[2]));
        }
    }
    found
}

fn decode_entities(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The quoted messages of Chromium's `:CONSOLE` log lines.
fn console_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| line.split_once(":CONSOLE").map(|(_, rest)| rest))
        .map(|rest| {
            rest.split_once("] ")
                .map_or(rest, |(_, message)| message)
                .to_string()
        })
        .collect()
}

fn browser_error(page: &Path, reason: String) -> ReportError {
    ReportError::Browser {
        page: page.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_markers_from_the_dumped_html_tag() {
        let dom = "<!DOCTYPE html>\n<html lang=\"en\" data-images-checked=\"3\" data-images-broken=\"a.png | b &amp; c.png\" data-images-ok=\"false\"><head>";
        let found = html_element_attributes(dom);
        assert_eq!(found["data-images-checked"], "3");
        assert_eq!(found["data-images-broken"], "a.png | b & c.png");
    }

    #[test]
    fn extracts_console_messages() {
        let log = "[1:1:1126/100955.1:ERROR:dbus/bus.cc:405] Failed to connect\n\
                   [2:2:1126/100955.6:INFO:CONSOLE:4] \"boom\", source: file:///tmp/t.html (4)\n";
        assert_eq!(
            console_lines(log),
            vec!["\"boom\", source: file:///tmp/t.html (4)"]
        );
    }

    #[test]
    fn a_missing_browser_says_how_to_install_it() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_chromium_in(None, empty.path().as_os_str().to_owned()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "headless Chromium not found (tried chromium, chromium-browser, google-chrome in PATH); install it \
             (Debian/Ubuntu: `apt-get install -y chromium`) or set DREAMPIPE_CHROMIUM to the browser binary"
        );
        let err = find_chromium_in(Some("/nonexistent/chrome".into()), "".into()).unwrap_err();
        assert!(err.to_string().starts_with(
            "headless Chromium not found (tried DREAMPIPE_CHROMIUM=/nonexistent/chrome)"
        ));
        let fake = empty.path().join("chromium-browser");
        std::fs::write(&fake, "").unwrap();
        assert_eq!(
            find_chromium_in(None, empty.path().as_os_str().to_owned()).unwrap(),
            fake
        );
    }

    #[test]
    fn file_urls_are_absolute_and_escaped() {
        assert_eq!(
            file_url(Path::new("/tmp/my report/index.html")).unwrap(),
            "file:///tmp/my%20report/index.html"
        );
    }
}
