//! `aiodma-guest`: the guest side of the guest/VMM signalling protocol, used by `/init`.
//!
//! ```text
//! aiodma-guest phase userspace|command   report a boot phase (the VMM logs its time)
//! aiodma-guest exit STATUS               report the command's exit status (the VMM stops)
//! ```

use std::process::ExitCode;

use aiodma_guest_tools::abi::platform;
use aiodma_guest_tools::port::outb;

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, phase] if cmd == "phase" => {
            let value = match phase.as_str() {
                "userspace" => platform::PHASE_USERSPACE,
                "command" => platform::PHASE_COMMAND,
                other => return Err(format!("unknown phase '{other}' (userspace|command)")),
            };
            outb(platform::PHASE_PORT, value).map_err(|e| format!("port write failed: {e}"))
        }
        [cmd, status] if cmd == "exit" => {
            let status: u8 = status
                .parse()
                .map_err(|_| format!("exit status '{status}' is not in 0..=255"))?;
            outb(platform::EXIT_PORT, status).map_err(|e| format!("port write failed: {e}"))
        }
        _ => Err("usage: aiodma-guest phase userspace|command | aiodma-guest exit STATUS".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("aiodma-guest: {msg}");
            ExitCode::from(2)
        }
    }
}
