//! Bakes the LibTorch library directory into every binary's rpath so that `sdkd` runs without
//! LD_LIBRARY_PATH, and compiles csrc/aten_extra.cpp: LibTorch operators tch does not wrap (the
//! fused AdamW kernel), and csrc/recompute.cpp (gradient checkpointing). LIBTORCH comes from
//! `.cargo/config.toml` (the project-local `.venv`).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/aten_extra.cpp");
    println!("cargo:rerun-if-changed=csrc/recompute.cpp");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: run `make setup` (it is set in .cargo/config.toml)")
    };
    let root = PathBuf::from(libtorch);
    let root = root.canonicalize().unwrap_or(root);
    let lib = root.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The linker drops libtorch_cuda under --as-needed (nothing references it by symbol), and
    // then CUDA silently reports unavailable: keep it.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/aten_extra.cpp")
        .file("csrc/recompute.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("sdkd_aten_extra");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
