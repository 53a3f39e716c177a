//! Bakes the LibTorch library directory into every binary's rpath so that `sdkd` runs without
//! LD_LIBRARY_PATH. LIBTORCH comes from `.cargo/config.toml` (the project-local `.venv`).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let root = PathBuf::from(libtorch);
    let lib = root.canonicalize().unwrap_or(root).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The linker drops libtorch_cuda under --as-needed (nothing references it by symbol), and
    // then CUDA silently reports unavailable: keep it.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
