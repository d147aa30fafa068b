//! Compiles the kernel programs in src/bpf with Debian's clang.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["lb", "decap", "probe", "support"];

fn main() {
    let src = Path::new("src/bpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // The whole directory: a change to any stage header rebuilds the programs.
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=WEIR_CLANG");

    let clang = std::env::var("WEIR_CLANG").unwrap_or_else(|_| "clang".into());
    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => fail(&format!(
            "`{clang}` not found: the BPF programs need clang. Install it with \
             `apt-get install clang` (or run `cargo xtask deps`)."
        )),
    }
    for header in ["bpf/bpf_helpers.h", "linux/bpf.h", "asm/types.h"] {
        let found = [
            "/usr/include",
            "/usr/include/x86_64-linux-gnu",
            "/usr/include/aarch64-linux-gnu",
        ]
        .iter()
        .any(|dir| Path::new(dir).join(header).exists());
        if !found {
            let package = match header {
                "bpf/bpf_helpers.h" => "libbpf-dev",
                "linux/bpf.h" => "linux-libc-dev",
                _ => "libc6-dev",
            };
            fail(&format!(
                "header <{header}> not found: install it with `apt-get install {package}` \
                 (or run `cargo xtask deps`)."
            ));
        }
    }

    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    for program in PROGRAMS {
        let input = src.join(format!("{program}.bpf.c"));
        let output = out.join(format!("{program}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .arg("-c")
            .arg(&input)
            .arg("-o")
            .arg(&output)
            .status()
            .unwrap_or_else(|e| fail(&format!("running {clang}: {e}")));
        if !status.success() {
            fail(&format!("clang failed to compile {}", input.display()));
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: weir-ebpf: {message}");
    std::process::exit(1);
}
