//! Following a job on NATS: its status messages and its results.

use framehost::config::NatsConfig;
use framehost::intake::{FRAME_HEADER, JobState, JobStatus};
use futures::{FutureExt as _, StreamExt as _};

/// One result as a job's subscriber receives it.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The `Framehost-Frame` header; absent for results emitted by `finish`.
    pub frame: Option<u64>,
    pub content_type: Option<String>,
    /// The body, parsed as JSON (every plugin used here emits JSON).
    pub body: serde_json::Value,
}

/// A job's status and results subjects, subscribed before the job is submitted so that
/// nothing is missed. Every status received is kept in [`JobWatch::seen`].
pub struct JobWatch {
    pub id: String,
    statuses: async_nats::Subscriber,
    results: async_nats::Subscriber,
    pub seen: Vec<JobStatus>,
}

impl JobWatch {
    /// Subscribes to the job's subjects; returns once the server has the subscriptions.
    pub async fn new(
        client: &async_nats::Client,
        nats: &NatsConfig,
        id: &str,
    ) -> anyhow::Result<Self> {
        let statuses = client.subscribe(nats.status_subject(id)).await?;
        let results = client.subscribe(nats.results_subject(id)).await?;
        client.flush().await?;
        Ok(Self {
            id: id.to_owned(),
            statuses,
            results,
            seen: Vec::new(),
        })
    }

    /// The next status message. Panics on one that is not a `JobStatus` or names another
    /// job: a user's tooling would choke on it too.
    pub async fn next_status(&mut self) -> Option<JobStatus> {
        let message = self.statuses.next().await?;
        let status: JobStatus = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
            panic!(
                "status message for job {} is not a JobStatus ({e}): {}",
                self.id,
                String::from_utf8_lossy(&message.payload)
            )
        });
        assert_eq!(
            status.job_id, self.id,
            "status published on the wrong subject"
        );
        self.seen.push(status.clone());
        Some(status)
    }

    /// Waits for the first status in `state`; the ones before it are kept in `seen`.
    pub async fn until(&mut self, state: JobState) -> Option<JobStatus> {
        while let Some(status) = self.next_status().await {
            if status.state == state {
                return Some(status);
            }
        }
        None
    }

    /// Waits for the first status for which no further status follows for this delivery
    /// (finished, stopped, failed, requeued).
    pub async fn until_final(&mut self) -> Option<JobStatus> {
        while let Some(status) = self.next_status().await {
            if status.state.is_final() {
                return Some(status);
            }
        }
        None
    }

    /// Statuses already received but not yet read, without waiting.
    pub fn buffered_statuses(&mut self) -> Vec<JobStatus> {
        let mut out = Vec::new();
        while let Some(Some(message)) = self.statuses.next().now_or_never() {
            if let Ok(status) = serde_json::from_slice::<JobStatus>(&message.payload) {
                self.seen.push(status.clone());
                out.push(status);
            }
        }
        out
    }

    /// The next result. Panics on a body that is not JSON.
    pub async fn next_result(&mut self) -> Option<JobResult> {
        let message = self.results.next().await?;
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let frame = header(FRAME_HEADER).map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{FRAME_HEADER} header {v:?} is not a frame index"))
        });
        let body = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
            panic!(
                "result of job {} is not JSON ({e}): {}",
                self.id,
                String::from_utf8_lossy(&message.payload)
            )
        });
        Some(JobResult {
            frame,
            content_type: header("Content-Type"),
            body,
        })
    }

    /// Results already received but not yet read, without waiting.
    pub fn buffered_results(&mut self) -> Vec<JobResult> {
        let mut out = Vec::new();
        while let Some(Some(result)) = self.next_result().now_or_never() {
            out.push(result);
        }
        out
    }
}

/// Every job's status messages (`<prefix>.status.>`), for a test that follows many jobs at
/// once; subscribed before the jobs are submitted. Statuses are kept in arrival order, which
/// for one host is the order it published them in.
pub struct StatusFeed {
    statuses: async_nats::Subscriber,
    pub seen: Vec<JobStatus>,
}

impl StatusFeed {
    /// Subscribes; returns once the server has the subscription.
    pub async fn new(client: &async_nats::Client, nats: &NatsConfig) -> anyhow::Result<Self> {
        let statuses = client
            .subscribe(format!("{}.status.>", nats.subject_prefix))
            .await?;
        client.flush().await?;
        Ok(Self {
            statuses,
            seen: Vec::new(),
        })
    }

    /// Reads statuses until `done` holds for those seen so far (checked after each).
    /// Returns false if the subscription ends first. Panics on a message that is not a
    /// `JobStatus`.
    pub async fn until(&mut self, mut done: impl FnMut(&[JobStatus]) -> bool) -> bool {
        while !done(&self.seen) {
            let Some(message) = self.statuses.next().await else {
                return false;
            };
            let status: JobStatus = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
                panic!(
                    "status message on {} is not a JobStatus ({e}): {}",
                    message.subject,
                    String::from_utf8_lossy(&message.payload)
                )
            });
            self.seen.push(status);
        }
        true
    }

    /// Statuses already received but not yet read, without waiting; kept in `seen` too.
    pub fn drain_buffered(&mut self) -> &[JobStatus] {
        let before = self.seen.len();
        while let Some(Some(message)) = self.statuses.next().now_or_never() {
            if let Ok(status) = serde_json::from_slice::<JobStatus>(&message.payload) {
                self.seen.push(status);
            }
        }
        &self.seen[before..]
    }
}
