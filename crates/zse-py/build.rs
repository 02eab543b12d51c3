//! With the `cuda` feature, the extension must name the driver library (`libcuda.so.1`)
//! as a dependency. cudarc links it by name, but at build time only a stub is at hand
//! (the driver is the GPU machine's own), and the linker's default `--as-needed` drops
//! a library that resolves none of the symbols: the driver's `cu*` functions would then
//! be unresolved when Python loads the extension.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-lcuda");
    }
}
