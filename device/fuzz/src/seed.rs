//! Writes structured programs for the `device` target (`aiodma_device::fuzz::device_program`)
//! into a directory, as a starting corpus that already reaches a driver's bring-up and its
//! requests: `cargo run --release --bin seed -- DIR [COUNT]`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: seed DIR [COUNT]");
        return ExitCode::FAILURE;
    };
    let count: u64 = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(64);
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("{dir}: {e}");
        return ExitCode::FAILURE;
    }
    for seed in 0..count {
        let path = std::path::Path::new(dir).join(format!("seed-{seed:04}"));
        if let Err(e) = std::fs::write(&path, aiodma_device::fuzz::device_program(seed)) {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    println!("{count} program(s) in {dir}");
    ExitCode::SUCCESS
}
