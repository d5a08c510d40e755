//! Puts libtorch's library folder on the rpath of every binary, test and doctest, so nobody has
//! to export LD_LIBRARY_PATH (torch-sys announces the folder as `DEP_TCH_LIBTORCH_LIB`), and
//! compiles the C++ shims (csrc/: AdamW updates and the autocast switch, which tch 0.24 cannot
//! express) against libtorch's headers.
use std::path::PathBuf;

/// The C++ shims: AdamW for src/sd/train/aten_adamw.rs, autocast for src/sd/autocast.rs.
const SHIM_SOURCES: [&str; 2] = ["csrc/adamw.cpp", "csrc/autocast.cpp"];

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for source in SHIM_SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    if let Some(lib_dir) = &lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:rustc-env=DREAMPIPE_LIBTORCH_LIB={lib_dir}");
    }
    compile_shim(lib_dir.as_deref());
}

/// libtorch's root folder (the one holding `include/`): `LIBTORCH_INCLUDE` or `LIBTORCH` as
/// torch-sys reads them, else the parent of the library folder torch-sys found.
fn libtorch_root(lib_dir: Option<&str>) -> Option<PathBuf> {
    ["LIBTORCH_INCLUDE", "LIBTORCH"]
        .iter()
        .find_map(|name| std::env::var_os(name).map(PathBuf::from))
        .or_else(|| lib_dir.and_then(|dir| PathBuf::from(dir).parent().map(PathBuf::from)))
}

fn compile_shim(lib_dir: Option<&str>) {
    let Some(root) = libtorch_root(lib_dir) else {
        panic!(
            "cannot find libtorch's headers for {SHIM_SOURCES:?}: set LIBTORCH to the libtorch folder (as for torch-sys)"
        );
    };
    let include = root.join("include");
    // torch-sys's default when LIBTORCH_CXX11_ABI is unset (libtorch 2.x is built with it).
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    let mut build = cc::Build::new();
    build.cpp(true).files(SHIM_SOURCES);
    // -isystem: libtorch's own headers are not ours to keep warning-free.
    for dir in [include.clone(), include.join("torch/csrc/api/include")] {
        build.flag("-isystem").flag(dir.display().to_string());
    }
    build
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .compile("dreampipe_shims");
}
