//! Bakes the LibTorch library directory into every binary's rpath so that `sdkd` runs without
//! LD_LIBRARY_PATH, and compiles csrc/aten_extra.cpp: LibTorch operators tch does not wrap (the
//! fused AdamW kernel), csrc/recompute.cpp (gradient checkpointing), and csrc/c10d.cpp: c10d's
//! TCPStore and process groups (Gloo always; NCCL where LibTorch has CUDA and the CUDA and NCCL
//! headers are found). LIBTORCH comes from
//! `.cargo/config.toml` (the project-local `.venv`).
use std::path::{Path, PathBuf};

/// The include folders NCCL's c10d header needs: the CUDA runtime headers, their `crt/`
/// internals and CCCL's `nv/target` (one folder in a CUDA toolkit, three pip packages:
/// nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl), and `nccl.h`. Searched in
/// SDKD_CUDA_INCLUDE (a `:` list), CUDA_HOME, /usr/local/cuda and the nvidia packages beside
/// LibTorch's wheel.
fn cuda_and_nccl_includes(libtorch: &Path) -> Option<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::env::var("SDKD_CUDA_INCLUDE").unwrap_or_default().split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect();
    if let Ok(home) = std::env::var("CUDA_HOME") {
        dirs.push(Path::new(&home).join("include"));
    }
    dirs.push("/usr/local/cuda/include".into());
    if let Some(site) = libtorch.parent() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            dirs.extend(entries.flatten().map(|e| e.path().join("include")));
        }
    }
    // CCCL's headers sit in include/cccl in the pip packages.
    let more: Vec<PathBuf> = dirs.iter().map(|d| d.join("cccl")).collect();
    dirs.extend(more);
    let find = |file: &str| dirs.iter().find(|d| d.join(file).exists()).cloned();
    let mut found = vec![];
    for file in ["cuda_runtime_api.h", "crt/host_config.h", "nv/target", "nccl.h"] {
        let dir = find(file)?;
        if !found.contains(&dir) {
            found.push(dir);
        }
    }
    Some(found)
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/aten_extra.cpp");
    println!("cargo:rerun-if-changed=csrc/shim.h");
    println!("cargo:rerun-if-changed=csrc/c10d.cpp");
    println!("cargo:rerun-if-env-changed=SDKD_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
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
    // Gloo's headers are not in the wheel; the few ProcessGroupGloo.hpp includes are vendored.
    let mut c10d = cc::Build::new();
    c10d.cpp(true)
        .file("csrc/c10d.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .include("csrc/third_party")
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-DUSE_C10D_GLOO")
        .warnings(false);
    let cuda = lib.join("libtorch_cuda.so").exists();
    let nccl = match cuda_and_nccl_includes(&root) {
        Some(includes) if cuda => {
            for dir in includes {
                c10d.include(dir);
            }
            c10d.flag("-DUSE_C10D_NCCL").flag("-DSDKD_WITH_NCCL");
            true
        }
        _ => {
            println!("cargo:warning=c10d: no CUDA+NCCL headers found (SDKD_CUDA_INCLUDE, CUDA_HOME): NCCL groups compiled out, Gloo only");
            false
        }
    };
    // What `sdkd --version` states, so that a build without NCCL shows (scripts/gpu-build.sh
    // refuses one): the LibTorch version (torch/version.py of the wheel), CUDA, process groups.
    let torch_version = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_string())))
        .unwrap_or_else(|| "unknown".into());
    println!(
        "cargo:rustc-env=SDKD_BUILD=LibTorch {torch_version}, {}, process groups: {}",
        if cuda { "CUDA" } else { "CPU only" },
        if nccl { "gloo nccl" } else { "gloo" }
    );
    c10d.compile("sdkd_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
