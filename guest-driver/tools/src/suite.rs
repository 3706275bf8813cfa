//! `aiodma-aio bench-suite`: the async-vs-sync matrix in one boot, as one table.
//!
//! 4 KiB random reads and writes with sync at QD1 and libaio and io_uring at QD1/8/32
//! (`aiodma-aio bench`), then the same through fio if it is there (the fio layer's
//! `/etc/fio/bench-randread.fio` and `bench-randwrite.fio`, with their `runtime=` set to the
//! suite's time), then the speed-up of each async engine at QD32 over sync QD1.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::bench::{self, BenchOpts, Engine, Pattern, Row, Stop};
use crate::util::Percentiles;

/// What `bench-suite` was asked to do.
#[derive(Debug, Clone)]
pub struct SuiteOpts {
    /// Device path.
    pub dev: String,
    /// Time per point.
    pub time: Duration,
    /// Label of the fault setting (first column).
    pub label: String,
    /// Print the header line.
    pub header: bool,
    /// Run the fio jobs (when fio is installed).
    pub fio: bool,
    /// Where the fio job files are.
    pub fio_dir: String,
    /// Print JSON lines instead of the table.
    pub json: bool,
}

const POINTS: [(Engine, usize); 7] = [
    (Engine::Sync, 1),
    (Engine::Libaio, 1),
    (Engine::Libaio, 8),
    (Engine::Libaio, 32),
    (Engine::Uring, 1),
    (Engine::Uring, 8),
    (Engine::Uring, 32),
];

fn emit(o: &SuiteOpts, row: &Row) {
    if o.json {
        println!("{}", row.json(Some(&o.label)));
    } else {
        println!("{}", row.line(Some(&o.label)));
    }
}

/// Run the matrix; an error stops it.
pub fn run(o: &SuiteOpts) -> Result<(), String> {
    if o.header && !o.json {
        println!("{}", Row::header(true));
    }
    let mut rows = Vec::new();
    for rw in [Pattern::RandRead, Pattern::RandWrite] {
        for (engine, qd) in POINTS {
            let row = bench::run(&BenchOpts {
                dev: o.dev.clone(),
                engine,
                bs: 4096,
                qd,
                rw,
                stop: Stop::Time(o.time),
                direct: true,
                seed: 1,
                span: None,
            })
            .map_err(|e| format!("{} qd {qd} {}: {e}", engine.name(), rw.name()))?;
            emit(o, &row);
            rows.push(row);
        }
    }
    if o.fio && Path::new("/usr/bin/fio").exists() {
        for rw in ["randread", "randwrite"] {
            let job = Path::new(&o.fio_dir).join(format!("bench-{rw}.fio"));
            for row in run_fio(&job, &o.dev, o.time)? {
                emit(o, &row);
                rows.push(row);
            }
        }
    } else if o.fio {
        eprintln!("aiodma-aio: bench-suite: no /usr/bin/fio (boot with --initrd images/out/fio.cpio.gz); fio rows skipped");
    }
    if !o.json {
        for line in speedups(&rows, &o.label) {
            println!("{line}");
        }
    }
    Ok(())
}

/// "async QD32 vs sync QD1" lines per tool and pattern.
fn speedups(rows: &[Row], label: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (tool, sync) in [("aiodma-aio", "sync"), ("fio", "psync")] {
        for rw in ["randread", "randwrite"] {
            let find = |engine: &str, qd: u32| {
                rows.iter()
                    .find(|r| r.tool == tool && r.rw == rw && r.engine == engine && r.qd == qd)
                    .map(|r| r.iops)
            };
            let Some(base) = find(sync, 1).filter(|b| *b > 0.0) else {
                continue;
            };
            let parts: Vec<String> = ["libaio", "uring"]
                .iter()
                .filter_map(|e| find(e, 32).map(|v| format!("{e} QD32 {:.1}x", v / base)))
                .collect();
            if !parts.is_empty() {
                out.push(format!(
                    "# {label} {tool} {rw}: vs {sync} QD1 ({base:.0} IOPS): {}",
                    parts.join(", ")
                ));
            }
        }
    }
    out
}

/// A fio job file with its `filename=` set to `dev` and its `runtime=` to `time`.
pub fn adapt_fio_job(text: &str, dev: &str, time: Duration) -> String {
    text.lines()
        .map(|l| {
            let key = l.trim_start();
            if key.starts_with("runtime=") {
                format!("runtime={}ms", time.as_millis().max(1))
            } else if key.starts_with("filename=") {
                format!("filename={dev}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Run one fio job file on `dev` (its `runtime=` replaced by `time`) and turn each job into a
/// row.
fn run_fio(job: &Path, dev: &str, time: Duration) -> Result<Vec<Row>, String> {
    let text = std::fs::read_to_string(job).map_err(|e| format!("{}: {e}", job.display()))?;
    let text = adapt_fio_job(&text, dev, time);
    let name = job
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = std::env::temp_dir().join(format!("aiodma-suite-{name}"));
    std::fs::write(&tmp, text + "\n").map_err(|e| format!("{}: {e}", tmp.display()))?;
    let out = Command::new("/usr/bin/fio")
        .arg("--output-format=json")
        .arg(&tmp)
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    let _ = std::fs::remove_file(&tmp);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "fio {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_fio_json(&stdout).map_err(|e| format!("fio {name}: {e}"))
}

/// Rows from fio's `--output-format=json` (anything before the first `{` is skipped).
pub fn parse_fio_json(text: &str) -> Result<Vec<Row>, String> {
    let start = text.find('{').ok_or("no JSON in fio's output")?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| format!("bad JSON: {e}"))?;
    let global = &v["global options"];
    let jobs = v["jobs"].as_array().ok_or("no jobs in fio's output")?;
    let mut rows = Vec::new();
    for j in jobs {
        let opt = |k: &str| -> Option<String> {
            j["job options"][k]
                .as_str()
                .or_else(|| global[k].as_str())
                .map(str::to_string)
        };
        let rw = opt("rw").unwrap_or_else(|| "read".into());
        let dir = if rw.contains("write") && !rw.contains("rw") {
            "write"
        } else {
            "read"
        };
        let s = &j[dir];
        let bs = opt("bs")
            .and_then(|b| crate::util::parse_size(&b))
            .unwrap_or(4096);
        let qd = opt("iodepth").and_then(|q| q.parse().ok()).unwrap_or(1u32);
        let engine = opt("ioengine").unwrap_or_else(|| "psync".into());
        let pct = |key: &str| -> f64 {
            let find = |lat: &str| s[lat]["percentile"][key].as_f64();
            find("lat_ns").or_else(|| find("clat_ns")).unwrap_or(0.0) / 1000.0
        };
        let secs = s["runtime"].as_f64().unwrap_or(0.0) / 1000.0;
        rows.push(Row {
            tool: "fio".into(),
            engine: match engine.as_str() {
                "io_uring" => "uring".into(),
                e => e.into(),
            },
            bs,
            qd,
            rw,
            requests: s["total_ios"].as_u64().unwrap_or(0),
            secs,
            iops: s["iops"].as_f64().unwrap_or(0.0),
            mbps: s["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            lat: Percentiles {
                p50: pct("50.000000"),
                p99: pct("99.000000"),
                p999: pct("99.900000"),
            },
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_job_follows_the_device_and_time() {
        let job = "[global]\nfilename=/dev/aiodma0\nruntime=2\n[a]\niodepth=1";
        assert_eq!(
            adapt_fio_job(job, "/dev/vda", Duration::from_millis(1500)),
            "[global]\nfilename=/dev/vda\nruntime=1500ms\n[a]\niodepth=1"
        );
    }

    #[test]
    fn fio_json_rows() {
        let text = r#"note: something
{ "global options": { "bs": "4k", "rw": "randread" },
  "jobs": [ { "jobname": "x", "job options": { "ioengine": "io_uring", "iodepth": "8" },
    "read": { "iops": 1000.5, "bw_bytes": 4098048, "runtime": 2000, "total_ios": 2001,
      "lat_ns": { "percentile": { "50.000000": 8000, "99.000000": 9000, "99.900000": 12000 } } },
    "write": { "iops": 0 } } ] }"#;
        let rows = parse_fio_json(text).unwrap_or_default();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.engine.as_str(), r.qd, r.bs, r.rw.as_str()),
            ("uring", 8, 4096, "randread")
        );
        assert_eq!((r.lat.p50, r.lat.p99, r.lat.p999), (8.0, 9.0, 12.0));
        assert!((r.mbps - 4.098048).abs() < 1e-9);
    }
}
