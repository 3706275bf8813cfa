//! Runs a fuzz target's function over files (crash reproducers, a corpus directory) on stable
//! Rust: `cargo run --release --bin replay -- [-v] [--strict] [--reuse] TARGET PATH...` with TARGET
//! `parse` or `device`. `-v` prints what each `device` input reached (operations, requests,
//! resets). `--reuse` runs the inputs the way the cargo-fuzz target does, on devices kept from
//! one input to the next (per setup), so a sequence of files can reproduce a failure that needs
//! what earlier inputs left behind. An input that runs into a finding already reported and not
//! fixed yet
//! (`aiodma_device::fuzz::OPEN_FINDINGS`) is shown as such and not counted as a failure, unless
//! `--strict`.

use std::path::Path;
use std::process::ExitCode;

type Target = fn(&[u8]) -> Result<(), String>;

struct Replay {
    target: Target,
    verbose: bool,
    strict: bool,
    count: usize,
    known: usize,
    failures: usize,
}

impl Replay {
    fn run(&mut self, path: &Path) {
        if path.is_dir() {
            let Ok(entries) = std::fs::read_dir(path) else {
                eprintln!("{}: cannot read directory", path.display());
                self.failures += 1;
                return;
            };
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                self.run(&p);
            }
            return;
        }
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                self.failures += 1;
                return;
            }
        };
        self.count += 1;
        let outcome = if self.verbose {
            let (r, stats) = aiodma_device::fuzz::device_run(&data);
            println!("{}: {stats:?}", path.display());
            r
        } else {
            (self.target)(&data)
        };
        if let Err(e) = outcome {
            match aiodma_device::fuzz::open_finding(&e) {
                Some(what) if !self.strict => {
                    println!("{}: open finding ({what})", path.display());
                    self.known += 1;
                }
                _ => {
                    eprintln!("{}: {e}", path.display());
                    self.failures += 1;
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut verbose = false;
    let mut strict = false;
    let mut reuse = false;
    while let Some(flag) = args.first() {
        match flag.as_str() {
            "-v" => verbose = true,
            "--strict" => strict = true,
            "--reuse" => reuse = true,
            _ => break,
        }
        args.remove(0);
    }
    let target: Target = match args.first().map(String::as_str) {
        Some("parse") => aiodma_device::fuzz::fuzz_input,
        Some("device") if reuse => aiodma_device::fuzz::fuzz_device_reusing,
        Some("device") => aiodma_device::fuzz::fuzz_device,
        _ => {
            eprintln!("usage: replay [-v] [--strict] [--reuse] parse|device PATH...");
            return ExitCode::FAILURE;
        }
    };
    let mut replay = Replay {
        target,
        verbose: verbose && args.first().is_some_and(|a| a == "device"),
        strict,
        count: 0,
        known: 0,
        failures: 0,
    };
    for arg in args.iter().skip(1) {
        replay.run(Path::new(arg));
    }
    println!(
        "{} input(s), {} failure(s), {} open finding(s)",
        replay.count, replay.failures, replay.known
    );
    if replay.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
