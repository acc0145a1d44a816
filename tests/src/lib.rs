//! Test support for framehost's end-to-end tests.
//!
//! - [`NatsServer`]: a real `nats-server` with JetStream on a free port and its own storage,
//!   or a cluster of them.
//! - [`HostProcess`]: the `framehost serve` binary with a configuration written for the test.
//! - [`Cluster`]: one server, the hosts a test starts, and what a test asserts about jobs
//!   (their status, results, the work queue and the dead-letter stream).
//! - [`artifacts`]: where the binary and the plugins are, built before the tests run.
//! - [`captures`]: small synthetic capture files.
//! - [`catalogue`]: `framehost plugin` commands, replica status and plugin variants.
//! - [`scrape`]: a host's `/metrics`, `/healthz` and `/readyz`, and the Prometheus text
//!   format read into samples.
//! - [`livekit`]: a LiveKit server double that speaks the real protocol, and a stream generator
//!   that plays the upstream vision service through it.
//!
//! Every wait is bounded; a timeout or a failed expectation panics with what was expected
//! and the tail of each host's log.

pub mod artifacts;
pub mod captures;
pub mod catalogue;
mod cluster;
mod host_process;
mod jobs;
pub mod livekit;
mod nats_server;
pub mod scrape;
mod secure_nats;

pub use cluster::{Cluster, JOB_WAIT, SUBMIT_IN_FLIGHT, within};
pub use host_process::HostProcess;
pub use jobs::{JobResult, JobWatch, StatusFeed};
pub use nats_server::NatsServer;
pub use secure_nats::{Auth, SecureNats};
