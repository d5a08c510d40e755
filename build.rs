//! Puts libtorch's library folder on the rpath of every binary, test and doctest, so nobody has
//! to export LD_LIBRARY_PATH. torch-sys announces the folder as `DEP_TCH_LIBTORCH_LIB`.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:rustc-env=DREAMPIPE_LIBTORCH_LIB={lib_dir}");
    }
}
