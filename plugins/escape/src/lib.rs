//! TEST SUPPORT ONLY: a frame processor that tries to get out of the sandbox, so that a
//! test can check it gets nothing. Never route a production job type to it.
//!
//! On `init` and on every `process` it makes each [`Attempt`] with plain Rust std APIs
//! (which, built for `wasm32-wasip2`, go through WASI): reading files and directories,
//! writing a file, reading the environment, the arguments and the working directory,
//! connecting to a TCP port, binding TCP and UDP sockets, and resolving a name. None of
//! them may panic: each is reported as an [`Outcome`], `{"attempt": "fs_read:/etc/passwd",
//! "ok": false, "detail": "<the error, or what it got>"}`, with the detail cut to
//! [`MAX_DETAIL_CHARS`].
//!
//! Per frame it publishes one `application/json` result, `{"frame": 7, "attempts": [..]}`.
//! `finish` returns the [`Summary`]: frames seen, the attempts made in `init` and for the
//! last frame, and the names of every attempt that ever succeeded.
//!
//! | config key | default | meaning |
//! | --- | --- | --- |
//! | `tcp_port` | none | port on 127.0.0.1 to connect to; no connect attempt without it |
//! | `env_name` | none | an environment variable to read by name, besides listing them all |
//! | `read_paths` | `[]` | more files to try to read, e.g. one the host can read |
//! | `write_path` | `/tmp/escape-was-here` | the file to try to create |
//!
//! The probes are plain Rust and run natively too, where they do reach the machine; the
//! native tests check that each probe reports a success when there is one to report.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt::Display;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod plugin;

/// Longest `detail` kept, in characters; the rest is cut and marked with `...`.
pub const MAX_DETAIL_CHARS: usize = 200;
/// Bytes read from a file that opens: enough to show what it was.
const READ_BYTES: u64 = 256;
/// Bound on the TCP connect, so a port that swallows SYNs cannot stall a frame.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The default file `fs_write` tries to create.
pub const DEFAULT_WRITE_PATH: &str = "/tmp/escape-was-here";

/// The job's config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Port on 127.0.0.1 to connect to. Defaults to none: no connect attempt.
    pub tcp_port: Option<u16>,
    /// An environment variable to read by name. Defaults to none.
    pub env_name: Option<String>,
    /// More files to try to read. Defaults to none.
    pub read_paths: Vec<String>,
    /// The file to try to create. Defaults to [`DEFAULT_WRITE_PATH`].
    pub write_path: Option<String>,
}

/// What one attempt got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Which attempt: `kind:target`, e.g. `fs_read:/etc/passwd` or `tcp_connect:127.0.0.1:80`.
    pub attempt: String,
    /// True when the attempt got anything at all (an empty list counts as nothing).
    pub ok: bool,
    /// The error text, or what the attempt got, cut to [`MAX_DETAIL_CHARS`].
    pub detail: String,
}

/// The `finish` summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub frames: u64,
    /// The attempts made in `init`.
    pub init: Vec<Outcome>,
    /// The attempts made for the last frame; empty without frames.
    pub last_frame: Vec<Outcome>,
    /// Every attempt that succeeded at least once, in `init` or any frame.
    pub ever_ok: BTreeSet<String>,
}

/// One job's escape attempts.
#[derive(Debug)]
pub struct Escape {
    config: Config,
    frames: u64,
    init: Vec<Outcome>,
    last_frame: Vec<Outcome>,
    ever_ok: BTreeSet<String>,
}

impl Escape {
    /// Starts a job and makes the first round of attempts.
    pub fn new(config: Config) -> Self {
        let mut escape = Self {
            config,
            frames: 0,
            init: Vec::new(),
            last_frame: Vec::new(),
            ever_ok: BTreeSet::new(),
        };
        escape.init = escape.attempt_all();
        escape
    }

    /// Makes every attempt again for one frame and returns what they got.
    pub fn attempt_frame(&mut self) -> Vec<Outcome> {
        self.frames += 1;
        self.last_frame = self.attempt_all();
        self.last_frame.clone()
    }

    pub fn summary(self) -> Summary {
        Summary {
            frames: self.frames,
            init: self.init,
            last_frame: self.last_frame,
            ever_ok: self.ever_ok,
        }
    }

    fn attempt_all(&mut self) -> Vec<Outcome> {
        let outcomes = attempts(&self.config);
        for outcome in outcomes.iter().filter(|o| o.ok) {
            self.ever_ok.insert(outcome.attempt.clone());
        }
        outcomes
    }
}

/// Makes every attempt once, in a fixed order.
pub fn attempts(config: &Config) -> Vec<Outcome> {
    let mut out = Vec::new();

    let mut files = vec![
        "/etc/passwd".to_owned(),
        "/proc/self/environ".to_owned(),
        "Cargo.toml".to_owned(),
    ];
    files.extend(config.read_paths.iter().cloned());
    for path in &files {
        out.push(outcome(format!("fs_read:{path}"), read_file(path)));
    }
    for dir in [".", "/"] {
        out.push(outcome(format!("fs_read_dir:{dir}"), read_dir(dir)));
    }
    out.push(outcome(
        "fs_metadata:/".to_owned(),
        std::fs::metadata("/").map(|m| format!("{m:?}")),
    ));
    let write_path = config.write_path.as_deref().unwrap_or(DEFAULT_WRITE_PATH);
    out.push(outcome(
        format!("fs_write:{write_path}"),
        std::fs::write(write_path, b"escaped\n").map(|()| "written".to_owned()),
    ));

    out.push(nonempty("env_vars", Ok::<_, Infallible>(env_vars())));
    if let Some(name) = &config.env_name {
        out.push(outcome(format!("env_var:{name}"), std::env::var(name)));
    }
    out.push(nonempty(
        "env_args",
        Ok::<_, Infallible>(
            std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        ),
    ));
    out.push(outcome(
        "env_current_dir".to_owned(),
        std::env::current_dir().map(|d| d.display().to_string()),
    ));

    if let Some(port) = config.tcp_port {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        out.push(outcome(format!("tcp_connect:{addr}"), tcp_connect(addr)));
    }
    out.push(outcome(
        "tcp_bind:127.0.0.1:0".to_owned(),
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr().map(|a| a.to_string())),
    ));
    out.push(outcome(
        "udp_bind:127.0.0.1:0".to_owned(),
        UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr().map(|a| a.to_string())),
    ));
    out.push(nonempty(
        "dns_lookup:localhost",
        ("localhost", 80)
            .to_socket_addrs()
            .map(|addrs| addrs.map(|a| a.to_string()).collect()),
    ));

    out
}

/// The first [`READ_BYTES`] of a file, as lossy text.
fn read_file(path: &str) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(READ_BYTES)
        .read_to_end(&mut bytes)?;
    Ok(format!(
        "{} bytes: {}",
        bytes.len(),
        String::from_utf8_lossy(&bytes)
    ))
}

/// The names in a directory, or the first error met listing it.
fn read_dir(path: &str) -> std::io::Result<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(format!("{} entries: {}", names.len(), names.join(", ")))
}

fn env_vars() -> Vec<String> {
    std::env::vars_os()
        .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
        .collect()
}

/// Connects with a timeout; where the platform has no timed connect, connects plainly
/// rather than report a refusal the sandbox did not make.
fn tcp_connect(addr: SocketAddr) -> std::io::Result<String> {
    let stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => TcpStream::connect(addr)?,
        other => other?,
    };
    Ok(format!("connected to {}", stream.peer_addr()?))
}

fn outcome<E: Display>(attempt: String, result: Result<String, E>) -> Outcome {
    match result {
        Ok(got) => Outcome {
            attempt,
            ok: true,
            detail: truncate(got),
        },
        Err(e) => Outcome {
            attempt,
            ok: false,
            detail: truncate(e.to_string()),
        },
    }
}

/// A listing that came back empty got nothing: `ok` is false, `detail` says `empty`.
fn nonempty<E: Display>(attempt: &str, result: Result<Vec<String>, E>) -> Outcome {
    match result {
        Ok(items) if items.is_empty() => Outcome {
            attempt: attempt.to_owned(),
            ok: false,
            detail: "empty".to_owned(),
        },
        Ok(items) => outcome(attempt.to_owned(), Ok::<_, E>(items.join(" "))),
        Err(e) => outcome(attempt.to_owned(), Err(e)),
    }
}

fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_DETAIL_CHARS) {
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(outcomes: &'a [Outcome], attempt: &str) -> &'a Outcome {
        outcomes
            .iter()
            .find(|o| o.attempt == attempt)
            .unwrap_or_else(|| panic!("no {attempt} in {outcomes:?}"))
    }

    /// Natively nothing stands in the way, so each probe must report what it reached;
    /// a probe that reported failure here would make the sandbox test meaningless.
    #[test]
    fn probes_report_what_they_reach_natively() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = std::env::temp_dir().join(format!("escape-native-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let readable = dir.join("readable.txt");
        std::fs::write(&readable, "hello from the host").unwrap();
        let written = dir.join("written.txt");
        let config = Config {
            tcp_port: Some(listener.local_addr().unwrap().port()),
            env_name: Some("PATH".into()),
            read_paths: vec![readable.display().to_string()],
            write_path: Some(written.display().to_string()),
        };

        let outcomes = attempts(&config);
        let read = find(&outcomes, &format!("fs_read:{}", readable.display()));
        assert!(
            read.ok && read.detail.contains("hello from the host"),
            "{read:?}"
        );
        assert!(find(&outcomes, "fs_read_dir:/").ok);
        assert!(find(&outcomes, &format!("fs_write:{}", written.display())).ok);
        assert!(written.exists());
        assert!(find(&outcomes, "env_vars").ok);
        assert!(find(&outcomes, "env_var:PATH").ok);
        assert!(find(&outcomes, "env_args").ok);
        let connect = find(
            &outcomes,
            &format!("tcp_connect:{}", listener.local_addr().unwrap()),
        );
        assert!(connect.ok, "{connect:?}");
        assert!(listener.accept().is_ok());
        assert!(find(&outcomes, "tcp_bind:127.0.0.1:0").ok);
        assert!(find(&outcomes, "udp_bind:127.0.0.1:0").ok);

        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn failures_are_reported_not_panicked() {
        let outcomes = attempts(&Config {
            read_paths: vec!["/no/such/file".into()],
            write_path: Some("/no/such/dir/file".into()),
            ..Config::default()
        });
        let read = find(&outcomes, "fs_read:/no/such/file");
        assert!(!read.ok && !read.detail.is_empty(), "{read:?}");
        assert!(!find(&outcomes, "fs_write:/no/such/dir/file").ok);
    }

    #[test]
    fn details_are_cut() {
        let long = truncate("é".repeat(MAX_DETAIL_CHARS + 5));
        assert_eq!(long.chars().count(), MAX_DETAIL_CHARS + 3);
        assert_eq!(truncate("short".into()), "short");
    }

    #[test]
    fn summary_collects_every_success() {
        let mut escape = Escape::new(Config {
            write_path: Some("/no/such/dir/file".into()),
            ..Config::default()
        });
        escape.attempt_frame();
        let summary = escape.summary();
        assert_eq!(summary.frames, 1);
        assert!(summary.ever_ok.contains("env_vars"), "{summary:?}");
        assert!(!summary.ever_ok.contains("fs_write:/no/such/dir/file"));
    }
}
