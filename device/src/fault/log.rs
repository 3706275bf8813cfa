//! The fault log (`--fault-log`): one JSON line per fired fault and a summary line at the end,
//! and reading it back for `--fault-replay`.
//!
//! A line: `{"seq":12,"queue":0,"head":5,"op":"read","offset":4096,"length":4096,
//! "kind":"delay","delay_ns":150000,"t_us":8812}` — `seq` counts the valid requests the device
//! has taken since it was created (the order faults are decided in), the kind's drawn
//! parameters follow (`delay_ns`, `code`, `len`, `bits` + `seed`), and `t_us` is device time
//! (microseconds since the device was created; the only field a replay does not reproduce).
//! The summary: `{"summary":{"requests":N,"fired":M,"by_kind":{"delay":3,...}}}`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, LineWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::injector::{Decision, RequestFacts, Scheduled};
use crate::request::Op;

/// One fired fault, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Request sequence number.
    pub seq: u64,
    /// Queue.
    pub queue: u16,
    /// Head descriptor.
    pub head: u16,
    /// Op name.
    pub op: String,
    /// Device byte offset.
    pub offset: u64,
    /// Data bytes.
    pub length: u32,
    /// Fault kind.
    pub kind: String,
    /// `delay`: the delay drawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ns: Option<u64>,
    /// `status`: the status byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
    /// `short`: bytes transferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u32>,
    /// `corrupt`: bits flipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// `corrupt`: seed of the bit positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Device time in microseconds.
    pub t_us: u64,
}

impl LogEntry {
    /// The entry for `decision` on request `seq`.
    pub fn new(seq: u64, req: &RequestFacts, decision: &Decision, t: Duration) -> LogEntry {
        let mut e = LogEntry {
            seq,
            queue: req.queue,
            head: req.head,
            op: req.op.name().to_string(),
            offset: req.offset,
            length: req.length,
            kind: decision.kind_name().to_string(),
            delay_ns: None,
            code: None,
            len: None,
            bits: None,
            seed: None,
            t_us: u64::try_from(t.as_micros()).unwrap_or(u64::MAX),
        };
        match *decision {
            Decision::Delay(d) => {
                e.delay_ns = Some(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            }
            Decision::Status(c) => e.code = Some(c),
            Decision::Short(n) => e.len = Some(n),
            Decision::Corrupt { bits, seed } => {
                e.bits = Some(bits);
                e.seed = Some(seed);
            }
            _ => {}
        }
        e
    }

    /// The decision this entry records, or why it cannot be replayed.
    pub fn scheduled(&self) -> Result<Scheduled, String> {
        let op = Op::from_name(&self.op).ok_or_else(|| format!("unknown op '{}'", self.op))?;
        let need =
            |v: Option<u64>, what: &str| v.ok_or_else(|| format!("{} without {what}", self.kind));
        let decision = match self.kind.as_str() {
            "error" => Decision::Error,
            "drop" => Decision::Drop,
            "hang" => Decision::Hang,
            "reset" => Decision::Reset,
            "used-id" => Decision::UsedId,
            "used-dup" => Decision::UsedDup,
            "used-len" => Decision::UsedLen,
            "irq-lost" => Decision::IrqLost,
            "irq-spurious" => Decision::IrqSpurious,
            "delay" => Decision::Delay(Duration::from_nanos(need(self.delay_ns, "delay_ns")?)),
            "status" => Decision::Status(need(self.code.map(u64::from), "code")? as u8),
            "short" => Decision::Short(need(self.len.map(u64::from), "len")? as u32),
            "corrupt" => Decision::Corrupt {
                bits: need(self.bits.map(u64::from), "bits")? as u32,
                seed: need(self.seed, "seed")?,
            },
            other => return Err(format!("unknown fault kind '{other}'")),
        };
        Ok(Scheduled {
            seq: self.seq,
            op,
            decision,
        })
    }
}

/// The summary line's body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSummary {
    /// Requests decided on.
    pub requests: u64,
    /// Faults fired.
    pub fired: u64,
    /// Faults fired by kind.
    pub by_kind: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
struct SummaryLine {
    summary: LogSummary,
}

/// Writes the fault log. Each line is flushed as it is written, so a killed VMM leaves every
/// fault it fired on disk.
#[derive(Debug)]
pub struct FaultLog {
    out: LineWriter<File>,
    started: Instant,
    summary: LogSummary,
    failed: bool,
}

impl FaultLog {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> io::Result<FaultLog> {
        Ok(FaultLog {
            out: LineWriter::new(File::create(path)?),
            started: Instant::now(),
            summary: LogSummary::default(),
            failed: false,
        })
    }

    /// Records a fired fault (`Decision::Pass` only counts the request).
    pub fn record(&mut self, seq: u64, req: &RequestFacts, decision: &Decision) {
        self.summary.requests = seq;
        if *decision == Decision::Pass {
            return;
        }
        self.summary.fired += 1;
        *self
            .summary
            .by_kind
            .entry(decision.kind_name().to_string())
            .or_insert(0) += 1;
        let entry = LogEntry::new(seq, req, decision, self.started.elapsed());
        self.write_line(&entry);
    }

    fn write_line<T: Serialize>(&mut self, value: &T) {
        if self.failed {
            return;
        }
        let result = serde_json::to_string(value)
            .map_err(io::Error::other)
            .and_then(|line| writeln!(self.out, "{line}"));
        if let Err(e) = result {
            log::error!("fault log: {e}; no more entries are written");
            self.failed = true;
        }
    }

    /// What was recorded so far.
    pub fn summary(&self) -> &LogSummary {
        &self.summary
    }
}

impl Drop for FaultLog {
    fn drop(&mut self) {
        let line = SummaryLine {
            summary: self.summary.clone(),
        };
        self.write_line(&line);
    }
}

/// A fault log that cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The file cannot be read.
    #[error("fault replay '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A line is not a fault log line.
    #[error("fault replay '{path}' line {line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Reads a fault log written by [`FaultLog`] into the schedule a replay fires.
pub fn read_schedule(path: &Path) -> Result<Vec<Scheduled>, ReplayError> {
    let file = File::open(path).map_err(|source| ReplayError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| ReplayError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| ReplayError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        if line.trim().is_empty() || serde_json::from_str::<SummaryLine>(&line).is_ok() {
            continue;
        }
        let entry: LogEntry = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        out.push(entry.scheduled().map_err(bad)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_reads_back_as_the_schedule_it_recorded() {
        let dir = std::env::temp_dir().join(format!("aiodma-faultlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("faults.jsonl");
        let req = RequestFacts {
            queue: 1,
            head: 7,
            op: Op::Read,
            offset: 4096,
            length: 512,
        };
        let decisions = [
            Decision::Pass,
            Decision::Delay(Duration::from_nanos(1234)),
            Decision::Status(77),
            Decision::Short(100),
            Decision::Corrupt { bits: 3, seed: 99 },
            Decision::UsedDup,
        ];
        {
            let mut log = FaultLog::create(&path).unwrap();
            for (i, d) in decisions.iter().enumerate() {
                log.record(i as u64 + 1, &req, d);
            }
            assert_eq!(log.summary().fired, 5);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 6);
        assert!(text
            .lines()
            .last()
            .unwrap()
            .starts_with("{\"summary\":{\"requests\":6,\"fired\":5"));
        let schedule = read_schedule(&path).unwrap();
        let got: Vec<_> = schedule.iter().map(|s| (s.seq, s.decision)).collect();
        let want: Vec<_> = decisions
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, d)| (i as u64 + 1, *d))
            .collect();
        assert_eq!(got, want);
        std::fs::write(&path, "{\"seq\":1}\n").unwrap();
        let e = read_schedule(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
