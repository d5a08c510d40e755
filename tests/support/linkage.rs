//! Which shared libraries a binary links (`readelf -d`): the front binary and the torch-free
//! crates' test binaries must not link libtorch, so they start without its static initializers.
#![allow(dead_code)]
use std::path::Path;
use std::process::Command;

/// The shared libraries `binary` needs (the `NEEDED` entries of its dynamic section).
pub fn needed_libraries(binary: &Path) -> Vec<String> {
    let output = Command::new("readelf")
        .arg("-d")
        .arg(binary)
        .output()
        .expect("readelf (binutils) must be installed for this test");
    assert!(
        output.status.success(),
        "readelf failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| line.split('[').nth(1))
        .map(|name| name.trim_end_matches(']').to_string())
        .collect()
}

/// Asserts that `binary` is dynamically linked (it needs libc) and needs no libtorch library.
pub fn assert_no_libtorch(binary: &Path) {
    let needed = needed_libraries(binary);
    assert!(
        needed.contains(&"libc.so.6".to_string()),
        "{}: {needed:?}",
        binary.display()
    );
    assert!(
        !needed
            .iter()
            .any(|l| l.starts_with("libtorch") || l.starts_with("libc10")),
        "{} links libtorch: {needed:?}",
        binary.display()
    );
}

/// For the torch-free crates' test binaries: the running test executable itself links no
/// libtorch (a `dreampipe` dependency slipping into the crate would make it).
pub fn assert_this_test_binary_links_no_libtorch() {
    assert_no_libtorch(&std::env::current_exe().expect("current_exe"));
}
