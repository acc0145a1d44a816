//! De-duplication of reliable packets by sequence, per sender.
//!
//! A LiveKit server forwards each sender's reliable packets with the sender's own sequence
//! number and drops out-of-order ones itself, so a receiver sees one sender's sequences only
//! rise. It can still see one twice: the server replays its cache of recent reliable
//! messages to a participant that joins or migrates, and a resumed session may overlap what
//! was already delivered. A packet whose sequence is not above the last one seen from its
//! sender is a duplicate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Senders forgotten after this long without a packet, as LiveKit's own clients do.
pub const SENDER_TTL: Duration = Duration::from_secs(30);

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Duplicate,
}

/// Last sequence per sender sid.
///
/// Bounded by `max_senders`: when full, the sender silent the longest is forgotten (its next
/// packet is accepted whatever its sequence) and [`Dedup::evicted`] counts it. The state lives
/// for the whole job, across resumes and rejoins: a sender's sid never goes back, and a
/// sender that rejoins gets a new sid.
#[derive(Debug)]
pub struct Dedup {
    senders: HashMap<String, Sender>,
    max_senders: usize,
    evicted: u64,
}

#[derive(Debug)]
struct Sender {
    last_sequence: u32,
    seen: Instant,
}

impl Dedup {
    pub fn new(max_senders: usize) -> Self {
        Self {
            senders: HashMap::new(),
            max_senders: max_senders.max(1),
            evicted: 0,
        }
    }

    /// Checks one packet. Packets without a sender sid or with sequence 0 (senders that do
    /// not number their packets) are always accepted.
    pub fn check(&mut self, sender_sid: &str, sequence: u32, now: Instant) -> Verdict {
        if sender_sid.is_empty() || sequence == 0 {
            return Verdict::Accept;
        }
        if let Some(sender) = self.senders.get_mut(sender_sid) {
            let live = now.saturating_duration_since(sender.seen) < SENDER_TTL;
            if live && sequence <= sender.last_sequence {
                return Verdict::Duplicate;
            }
            sender.last_sequence = sequence;
            sender.seen = now;
            return Verdict::Accept;
        }

        if self.senders.len() >= self.max_senders {
            self.forget_stale(now);
        }
        if self.senders.len() >= self.max_senders {
            let oldest = self
                .senders
                .iter()
                .min_by_key(|(_, sender)| sender.seen)
                .map(|(sid, _)| sid.clone());
            if let Some(oldest) = oldest {
                self.senders.remove(&oldest);
                self.evicted += 1;
            }
        }
        self.senders.insert(
            sender_sid.to_owned(),
            Sender {
                last_sequence: sequence,
                seen: now,
            },
        );
        Verdict::Accept
    }

    /// The last sequence of every sender heard from within the TTL, for the `SyncState` a
    /// resume sends (a server uses it to replay what this participant missed).
    pub fn receive_states(&self, now: Instant) -> Vec<(String, u32)> {
        self.senders
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.seen) < SENDER_TTL)
            .map(|(sid, s)| (sid.clone(), s.last_sequence))
            .collect()
    }

    /// Senders forgotten because the map was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn forget_stale(&mut self, now: Instant) {
        self.senders
            .retain(|_, s| now.saturating_duration_since(s.seen) < SENDER_TTL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_repeated_and_older_sequences_per_sender() {
        let t = Instant::now();
        let mut d = Dedup::new(8);
        assert_eq!(d.check("PA_a", 1, t), Verdict::Accept);
        assert_eq!(d.check("PA_a", 2, t), Verdict::Accept);
        assert_eq!(d.check("PA_a", 2, t), Verdict::Duplicate);
        assert_eq!(d.check("PA_a", 1, t), Verdict::Duplicate);
        // Another sender has its own counter.
        assert_eq!(d.check("PA_b", 1, t), Verdict::Accept);
        assert_eq!(d.check("PA_a", 3, t), Verdict::Accept);
    }

    #[test]
    fn unnumbered_packets_pass() {
        let t = Instant::now();
        let mut d = Dedup::new(8);
        assert_eq!(d.check("", 5, t), Verdict::Accept);
        assert_eq!(d.check("", 5, t), Verdict::Accept);
        assert_eq!(d.check("PA_a", 0, t), Verdict::Accept);
        assert_eq!(d.check("PA_a", 0, t), Verdict::Accept);
    }

    #[test]
    fn a_sender_silent_past_the_ttl_starts_over() {
        let t = Instant::now();
        let mut d = Dedup::new(8);
        d.check("PA_a", 10, t);
        assert_eq!(d.check("PA_a", 3, t + SENDER_TTL), Verdict::Accept);
        assert!(d.receive_states(t + SENDER_TTL * 3).is_empty());
    }

    #[test]
    fn the_map_is_bounded_and_evicts_the_longest_silent() {
        let t = Instant::now();
        let mut d = Dedup::new(2);
        d.check("PA_a", 5, t);
        d.check("PA_b", 5, t + Duration::from_millis(1));
        d.check("PA_c", 5, t + Duration::from_millis(2));
        assert_eq!(d.evicted(), 1);
        let mut kept: Vec<_> = d.receive_states(t).into_iter().map(|(s, _)| s).collect();
        kept.sort();
        assert_eq!(kept, ["PA_b", "PA_c"]);
        // The forgotten sender's next packet is taken, whatever its sequence.
        assert_eq!(d.check("PA_a", 1, t), Verdict::Accept);
    }
}
