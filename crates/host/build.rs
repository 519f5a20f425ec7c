//! Marks whether a Firecracker binary was named at build time, so the tests
//! that need one show as ignored (SKIP in nextest) rather than passing
//! without running. Setting or changing `FIRECRACKER_BIN` rebuilds the crate
//! and runs them.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(firecracker_bin)");
    println!("cargo::rerun-if-env-changed=FIRECRACKER_BIN");
    if std::env::var_os("FIRECRACKER_BIN").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=firecracker_bin");
    }
}
