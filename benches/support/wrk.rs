//! Running the `wrk` HTTP load generator against a local server and reading its results back.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The Lua script wrk runs: every request is a `POST /orders/{id}/pay` with an id no other
/// request of this process has (the run's number, the wrk thread's number, then a counter of
/// that thread), and at the end one `RESULT` line with exact figures, so that nothing is read
/// from wrk's rounded text.
///
/// wrk gives each thread a Lua state of its own: `setup` runs in the main one and hands each
/// thread its number; `init` gets the arguments after `--`; `done` runs in the main one after
/// all threads stopped.
const SCRIPT: &str = r#"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

local prefix = ""
function init(args)
  prefix = "/orders/" .. args[1] .. "-" .. thread_id .. "-"
end

local sent = 0
function request()
  sent = sent + 1
  return wrk.format("POST", prefix .. sent .. "/pay")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d mean_us=%.1f p99_us=%d non_2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration, latency.mean, latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"#;

/// How to get wrk, for the message printed when it is missing.
pub const INSTALL_HINT: &str =
    "wrk is not installed; on Debian or Ubuntu: `apt-get install wrk` (then run the bench again)";

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub requests: u64,
    pub duration: Duration,
    pub mean_latency: Duration,
    pub p99_latency: Duration,
    /// Responses other than 2xx or 3xx.
    pub non_2xx: u64,
    /// Connect, read and write errors and timeouts.
    pub socket_errors: u64,
}

impl Figures {
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64()
    }
}

/// A wrk load: `threads` threads keeping `connections` keep-alive connections busy.
#[derive(Debug)]
pub struct Wrk {
    script: PathBuf,
    pub threads: u32,
    pub connections: u32,
    runs: u32,
}

impl Wrk {
    /// `None` if there is no `wrk` on the `PATH`.
    pub fn new(threads: u32, connections: u32) -> Option<Wrk> {
        match Command::new("wrk").arg("--version").output() {
            Err(error) if error.kind() == ErrorKind::NotFound => return None,
            // wrk answers --version with its usage and a non-zero status: it exists.
            _ => {}
        }
        let script = std::env::temp_dir().join(format!("k1s0-wrk-{}.lua", std::process::id()));
        std::fs::write(&script, SCRIPT).expect("write the wrk script");
        Some(Wrk {
            script,
            threads,
            connections,
            runs: 0,
        })
    }

    /// Runs wrk against `address` for `duration` (whole seconds, at least one).
    pub fn run(&mut self, address: SocketAddr, duration: Duration) -> Figures {
        self.runs += 1;
        let output = Command::new("wrk")
            .arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", duration.as_secs().max(1)))
            .arg("-s")
            .arg(&self.script)
            .arg(format!("http://{address}"))
            .arg("--")
            .arg(self.runs.to_string())
            .output()
            .expect("run wrk");
        let stdout = String::from_utf8_lossy(&output.stdout);
        match stdout.lines().find_map(parse_result) {
            Some(figures) if output.status.success() => figures,
            _ => panic!(
                "wrk failed ({}):\n{stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
    }
}

/// Reads the script's `RESULT key=value ...` line.
fn parse_result(line: &str) -> Option<Figures> {
    let fields = line.strip_prefix("RESULT ")?;
    let field = |name: &str| -> Option<f64> {
        fields
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(Figures {
        requests: field("requests")? as u64,
        duration: Duration::from_micros(field("duration_us")? as u64),
        mean_latency: Duration::from_secs_f64(field("mean_us")? / 1e6),
        p99_latency: Duration::from_micros(field("p99_us")? as u64),
        non_2xx: field("non_2xx")? as u64,
        socket_errors: field("socket_errors")? as u64,
    })
}

/// This machine's load averages (1, 5 and 15 minutes), as `/proc/loadavg` has them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| {
            let fields: Vec<&str> = text.split_whitespace().take(3).collect();
            (fields.len() == 3).then(|| fields.join(" "))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
