//! Runs the fuzz function over files (crash reproducers, a corpus directory) on stable Rust:
//! `cargo run --bin replay -- PATH...`.

use std::path::Path;
use std::process::ExitCode;

fn run(path: &Path, failures: &mut usize, count: &mut usize) {
    if path.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            eprintln!("{}: cannot read directory", path.display());
            *failures += 1;
            return;
        };
        for e in entries.flatten() {
            run(&e.path(), failures, count);
        }
        return;
    }
    match std::fs::read(path) {
        Ok(data) => {
            *count += 1;
            if let Err(e) = aiodma_device::fuzz::fuzz_input(&data) {
                eprintln!("{}: {e}", path.display());
                *failures += 1;
            }
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            *failures += 1;
        }
    }
}

fn main() -> ExitCode {
    let mut failures = 0;
    let mut count = 0;
    for arg in std::env::args_os().skip(1) {
        run(Path::new(&arg), &mut failures, &mut count);
    }
    println!("{count} input(s), {failures} failure(s)");
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
