//! Panics as one line. libtorch errors surface as panics in tch's non-`f_` ops (an allocation
//! of terabytes from an absurd size, CUDA out of memory, a shape mismatch); no verb lets one
//! reach the user as a backtrace. [`catch`] runs work with the panic hook silenced and returns
//! the panic as a one-line message (`out of memory allocating 14.6 TiB`); the hook installed
//! by [`install_hook`] prints any other panic as one `error:` line. With `RUST_BACKTRACE` set
//! (not `0`), Rust's full report is printed as usual.
use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, PanicHookInfo};

thread_local! {
    /// Set while [`catch`] runs on this thread: its caller reports the panic.
    static CAUGHT_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the user asked for backtraces.
fn backtraces_wanted() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}

/// Replaces the panic hook: silent inside [`catch`], one `error:` line elsewhere, Rust's
/// default report (with backtrace) when `RUST_BACKTRACE` is set.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
        if backtraces_wanted() {
            return default(info);
        }
        if CAUGHT_HERE.with(Cell::get) {
            return;
        }
        let place = info
            .location()
            .map(|l| format!(" (at {}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: {}{place}; RUST_BACKTRACE=1 shows a backtrace",
            describe(&message(info.payload()))
        );
    }));
}

/// Runs `work`, turning a panic into `Err(one line)`; the hook prints nothing for it.
pub fn catch<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    let before = CAUGHT_HERE.with(|flag| flag.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(work));
    CAUGHT_HERE.with(|flag| flag.set(before));
    result.map_err(|payload| describe(&message(payload.as_ref())))
}

/// The text a panic carried (`panic!("…")` or `.unwrap()` on an error).
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// One line for a panic message: allocation failures as "out of memory allocating …", a
/// libtorch error as its first line without the `unwrap` wrapping, anything else as it is.
pub fn describe(message: &str) -> String {
    if let Some(bytes) = number_after(message, "tried to allocate ") {
        return format!("out of memory allocating {}", human_bytes(bytes));
    }
    let cuda = "CUDA out of memory. Tried to allocate ";
    if let Some(at) = message.find(cuda) {
        let size = message[at + cuda.len()..]
            .split(' ')
            .take(2)
            .collect::<Vec<_>>();
        let size = size.join(" ");
        return format!(
            "out of GPU memory allocating {}",
            size.trim_end_matches('.')
        );
    }
    // tch's errors are Debug-printed: `Torch("first line\nException raised from …")`.
    let inner = message
        .split_once("Torch(\"")
        .map_or(message, |(_, rest)| rest);
    let first = inner.split("\\n").next().unwrap_or(inner);
    let first = first.split('\n').next().unwrap_or(first);
    first.trim_end_matches("\")").trim().to_string()
}

fn number_after(text: &str, marker: &str) -> Option<u64> {
    let at = text.find(marker)? + marker.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// `16000000000000` → `14.6 TiB`.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} bytes"),
        _ => format!("{value:.1} {}", units[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_failures_read_as_out_of_memory() {
        let cpu = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: you tried to allocate 16000000000000 bytes.\\nException raised from ...\")";
        assert_eq!(describe(cpu), "out of memory allocating 14.6 TiB");
        let cuda = "Torch(\"CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB\")";
        assert_eq!(describe(cuda), "out of GPU memory allocating 20.00 GiB");
        let shape = "called `Result::unwrap()` on an `Err` value: Torch(\"mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)\\nException raised from meta at …\")";
        assert_eq!(
            describe(shape),
            "mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"
        );
        assert_eq!(describe("plain"), "plain");
    }

    #[test]
    fn catch_returns_the_panic_as_one_line() {
        assert_eq!(catch(|| 4), Ok(4));
        let caught = catch(|| -> u8 { panic!("you tried to allocate 2048 bytes") });
        assert_eq!(caught, Err("out of memory allocating 2.0 KiB".to_string()));
    }
}
