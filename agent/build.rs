//! Embeds the eBPF object that `cargo xtask build-ebpf` built.
//!
//! A missing object, or one older than any source under ebpf/ or common/, fails
//! the build: the agent must never ship programs that do not match the code.
//! `WEFT_EBPF_OBJECT=<path>` picks another object; `WEFT_NO_EBPF=1` builds an
//! agent without one, whose eBPF datapath then refuses to load with that reason.

use std::{
    env,
    path::{Path, PathBuf},
    process::exit,
    time::SystemTime,
};

const TARGET: &str = "bpfel-unknown-none";
const OBJECT: &str = "weft-ebpf";

fn main() {
    for var in ["WEFT_EBPF_OBJECT", "WEFT_NO_EBPF", "CARGO_TARGET_DIR"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    let sources = [workspace.join("ebpf"), workspace.join("common")];
    for dir in &sources {
        for sub in ["src", "Cargo.toml"] {
            println!("cargo:rerun-if-changed={}", dir.join(sub).display());
        }
    }

    if env::var_os("WEFT_NO_EBPF").is_some_and(|v| !v.is_empty() && v != "0") {
        println!("cargo:rustc-cfg=weft_no_ebpf");
        println!("cargo:rustc-check-cfg=cfg(weft_no_ebpf)");
        return;
    }
    println!("cargo:rustc-check-cfg=cfg(weft_no_ebpf)");

    let object = match env::var_os("WEFT_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => match find_object() {
            Some(path) => path,
            None => fail(&format!(
                "the eBPF object ({TARGET}/release/{OBJECT}) was not found under the target directory; \
                 run `cargo xtask build-ebpf` first"
            )),
        },
    };
    println!("cargo:rerun-if-changed={}", object.display());
    let built = match std::fs::metadata(&object).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(e) => fail(&format!(
            "cannot read {}: {e}; run `cargo xtask build-ebpf`",
            object.display()
        )),
    };
    if let Some((newest, path)) = newest_source(&sources) {
        if newest > built {
            fail(&format!(
                "the eBPF object {} is older than {}; run `cargo xtask build-ebpf`",
                object.display(),
                path.display()
            ));
        }
    }
    println!("cargo:rustc-env=WEFT_EBPF_OBJECT_PATH={}", object.display());
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    exit(1)
}

/// `CARGO_TARGET_DIR` when set, else the ancestor of OUT_DIR that holds the
/// bpf target's output (OUT_DIR is `<target>[/<triple>]/<profile>/build/<pkg>/out`).
fn find_object() -> Option<PathBuf> {
    let relative = Path::new(TARGET).join("release").join(OBJECT);
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR") {
        let candidate = PathBuf::from(dir).join(&relative);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR")?);
    out_dir
        .ancestors()
        .map(|a| a.join(&relative))
        .find(|c| c.is_file())
}

/// The most recently modified file under the given directories' src/ and Cargo.toml.
fn newest_source(dirs: &[PathBuf]) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut stack: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| [d.join("src"), d.join("Cargo.toml")])
        .collect();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(modified) = meta.modified() {
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, path));
            }
        }
    }
    newest
}
