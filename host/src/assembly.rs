//! App-level assembly: the upstream sender splits one JSON message into parts, sends each as
//! its own text stream, and labels it with a `frame_meta` attribute. [`Assembler`] joins the
//! parts of a message in order once all of them are in.
//!
//! Like [`crate::streams`], it is sans-IO: fed completed [`TextStream`]s and the current time,
//! it emits whole messages and rejections into the caller's `Vec`, and
//! [`Assembler::expire`] is called when [`Assembler::next_deadline`] passes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::streams::TextStream;

/// The stream attribute that labels a part:
/// `{"message_id": "…", "frame_index": <u32>, "total_frames": <u32>}`, where `frame_index`
/// is the part's index from 0 and `total_frames` the number of parts (the names come from
/// the upstream sender). A stream without it is a whole one-part message.
pub const FRAME_META_ATTRIBUTE: &str = "frame_meta";

/// The longest `message_id` accepted, in bytes; a longer one is `bad_frame_meta`. It bounds
/// what the open and remembered messages hold in keys.
pub const MAX_MESSAGE_ID_BYTES: usize = 256;

/// The bounds of [`Assembler`]. Every one trips as an [`AssemblyRejection`] whose
/// [`reason`](AssemblyRejection::reason) label names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssemblyLimits {
    /// The most parts a message may declare (`total_frames`). A part declaring more is
    /// rejected as `too_many_parts` before anything is stored. Defaults to 64.
    pub max_parts: u32,

    /// The most text bytes of one message, all parts together. The part that would pass it
    /// drops the message as `message_too_large`. Defaults to 32 MiB.
    pub max_message_bytes: usize,

    /// The most messages with some but not all parts in. The first part of one more is
    /// refused as `too_many_open_messages` (the open ones are kept). Defaults to 16.
    pub max_open_messages: usize,

    /// The most text bytes held by all open messages together. The part that would pass it
    /// drops its message as `assembly_full` (the other open messages are kept). Defaults to
    /// 64 MiB.
    pub max_buffered_bytes: usize,

    /// How long a message may take from its first part to its last. Past it the message is
    /// dropped by [`Assembler::expire`] as `message_expired`. Defaults to 10 seconds.
    pub max_age: Duration,

    /// How many finished messages (completed or rejected, with more than one part) are
    /// remembered, so that a late or duplicate part of one is counted in
    /// [`AssemblyCounters::late_parts`] instead of opening it again. The oldest is forgotten
    /// first; a part arriving after its message was forgotten opens a new message, which
    /// then expires. Defaults to 256.
    pub remembered_messages: usize,
}

impl Default for AssemblyLimits {
    fn default() -> Self {
        Self {
            max_parts: 64,
            max_message_bytes: 32 * 1024 * 1024,
            max_open_messages: 16,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_age: Duration::from_secs(10),
            remembered_messages: 256,
        }
    }
}

/// One whole message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The `message_id` of its `frame_meta`, or the stream id of a one-part message without
    /// `frame_meta`.
    pub message_id: String,
    /// The sending participant's identity.
    pub sender: String,
    /// The parts' texts joined in index order.
    pub text: String,
    /// How many parts it had.
    pub parts: u32,
    /// When its first part arrived.
    pub first_part_at: Instant,
}

/// What [`Assembler`] emits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssemblyEvent {
    Message(Message),
    /// A message (or one unreadable part) was dropped; everything it held is freed.
    Rejected(MessageRejected),
}

/// A dropped message, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRejected {
    /// The message id, or the stream id when `frame_meta` names none.
    pub message_id: String,
    pub sender: String,
    pub reason: AssemblyRejection,
}

/// Why a message was dropped. [`reason`](Self::reason) gives a short label for metrics.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyRejection {
    /// `frame_meta` is not JSON of the expected shape, or its values make no sense.
    #[error("bad frame_meta: {0}")]
    BadFrameMeta(String),

    /// `total_frames` is above [`AssemblyLimits::max_parts`].
    #[error("message declares {total} parts, more than the limit of {limit}")]
    TooManyParts { total: u32, limit: u32 },

    /// `frame_index` is not below `total_frames`.
    #[error("part index {index} is out of range for {total} parts")]
    PartIndexOutOfRange { index: u32, total: u32 },

    /// Two parts of one message disagree on `total_frames`.
    #[error("parts disagree on the number of parts: {first} then {later}")]
    InconsistentTotal { first: u32, later: u32 },

    /// The parts add up to more than [`AssemblyLimits::max_message_bytes`].
    #[error("message grew past the limit of {limit} bytes")]
    MessageTooLarge { limit: usize },

    /// [`AssemblyLimits::max_open_messages`] messages were already open.
    #[error("{limit} messages are already open")]
    TooManyOpenMessages { limit: usize },

    /// The part would take the open messages past [`AssemblyLimits::max_buffered_bytes`].
    #[error("open messages would hold more than the limit of {limit} bytes")]
    AssemblyFull { limit: usize },

    /// Not all parts arrived within [`AssemblyLimits::max_age`].
    #[error("{received} of {total} parts arrived within {max_age:?}")]
    Expired {
        received: u32,
        total: u32,
        max_age: Duration,
    },
}

impl AssemblyRejection {
    /// A short snake_case label, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadFrameMeta(_) => "bad_frame_meta",
            Self::TooManyParts { .. } => "too_many_parts",
            Self::PartIndexOutOfRange { .. } => "part_index_out_of_range",
            Self::InconsistentTotal { .. } => "inconsistent_total",
            Self::MessageTooLarge { .. } => "message_too_large",
            Self::TooManyOpenMessages { .. } => "too_many_open_messages",
            Self::AssemblyFull { .. } => "assembly_full",
            Self::Expired { .. } => "message_expired",
        }
    }
}

/// Parts dropped without an event. They are what a retransmitting or slow sender produces,
/// so they are counted, not reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AssemblyCounters {
    /// Parts whose index was already in (the first copy is kept).
    pub duplicate_parts: u64,
    /// Parts of a message already completed or rejected (see
    /// [`AssemblyLimits::remembered_messages`]).
    pub late_parts: u64,
}

/// Joins the parts of messages.
///
/// # Bounds
///
/// | bound | default | past it | label |
/// | --- | --- | --- | --- |
/// | parts a message declares | 64 | message refused | `too_many_parts` |
/// | text bytes of one message | 32 MiB | message dropped, parts freed | `message_too_large` |
/// | open messages | 16 | the new message is refused | `too_many_open_messages` |
/// | text bytes of all open messages | 64 MiB | the message of the part dropped | `assembly_full` |
/// | time from first part | 10 s | message dropped by [`expire`](Self::expire) | `message_expired` |
/// | remembered finished messages | 256 | the oldest is forgotten | — |
///
/// Parts are stored in a map holding only the parts received, never a slot per declared
/// part, so a `total_frames` of a billion costs nothing before it is refused. At most
/// `max_buffered_bytes` are held, whatever the number of open messages. Every rejection of a
/// message drops what it holds and remembers its id, so it is reported once.
///
/// Messages are keyed by (sender identity, message id), so two senders cannot collide.
#[derive(Debug)]
pub struct Assembler {
    limits: AssemblyLimits,
    open: HashMap<MessageKey, OpenMessage>,
    recent: RecentMessages,
    /// Sum of the text bytes of all stored parts.
    held: usize,
    /// Messages opened so far; orders expiry reports.
    opened: u64,
    counters: AssemblyCounters,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MessageKey {
    sender: String,
    message_id: String,
}

#[derive(Debug)]
struct OpenMessage {
    total: u32,
    parts: BTreeMap<u32, String>,
    bytes: usize,
    first_part_at: Instant,
    opened_seq: u64,
}

/// One part's label, read from `frame_meta`.
#[derive(Debug)]
struct FrameMeta {
    message_id: String,
    index: u32,
    total: u32,
}

impl Assembler {
    pub fn new(limits: AssemblyLimits) -> Self {
        let recent = RecentMessages::new(limits.remembered_messages);
        Self {
            limits,
            open: HashMap::new(),
            recent,
            held: 0,
            opened: 0,
            counters: AssemblyCounters::default(),
        }
    }

    pub fn limits(&self) -> &AssemblyLimits {
        &self.limits
    }

    /// Feeds one completed stream received at `now`; whole and rejected messages go into
    /// `out`.
    pub fn push(&mut self, stream: TextStream, now: Instant, out: &mut Vec<AssemblyEvent>) {
        let TextStream {
            stream_id,
            sender,
            attributes,
            text,
            ..
        } = stream;

        let meta = match attributes.get(FRAME_META_ATTRIBUTE) {
            None => FrameMeta {
                message_id: stream_id,
                index: 0,
                total: 1,
            },
            Some(raw) => match parse_frame_meta(raw) {
                Ok(meta) => meta,
                Err((message_id, reason)) => {
                    let key = MessageKey {
                        sender,
                        message_id: message_id.unwrap_or(stream_id),
                    };
                    self.reject(key, AssemblyRejection::BadFrameMeta(reason), out);
                    return;
                }
            },
        };

        let key = MessageKey {
            sender,
            message_id: meta.message_id,
        };
        if self.recent.contains(&key) {
            self.counters.late_parts += 1;
            return;
        }

        if meta.total > self.limits.max_parts {
            let reason = AssemblyRejection::TooManyParts {
                total: meta.total,
                limit: self.limits.max_parts,
            };
            self.reject(key, reason, out);
            return;
        }
        if meta.index >= meta.total {
            let reason = AssemblyRejection::PartIndexOutOfRange {
                index: meta.index,
                total: meta.total,
            };
            self.reject(key, reason, out);
            return;
        }
        if text.len() > self.limits.max_message_bytes {
            let limit = self.limits.max_message_bytes;
            self.reject(key, AssemblyRejection::MessageTooLarge { limit }, out);
            return;
        }

        // A one-part message needs no state; it is not remembered either, so that a steady
        // flow of them does not push multi-part messages out of the remembered set.
        if meta.total == 1 && !self.open.contains_key(&key) {
            out.push(AssemblyEvent::Message(Message {
                message_id: key.message_id,
                sender: key.sender,
                text,
                parts: 1,
                first_part_at: now,
            }));
            return;
        }

        if !self.open.contains_key(&key) {
            if self.open.len() >= self.limits.max_open_messages {
                let limit = self.limits.max_open_messages;
                self.reject(key, AssemblyRejection::TooManyOpenMessages { limit }, out);
                return;
            }
            let message = OpenMessage {
                total: meta.total,
                parts: BTreeMap::new(),
                bytes: 0,
                first_part_at: now,
                opened_seq: self.opened,
            };
            self.opened += 1;
            self.open.insert(key.clone(), message);
        }

        let message = self.open.get_mut(&key).expect("opened above");
        if meta.total != message.total {
            let reason = AssemblyRejection::InconsistentTotal {
                first: message.total,
                later: meta.total,
            };
            self.reject(key, reason, out);
            return;
        }
        if message.parts.contains_key(&meta.index) {
            self.counters.duplicate_parts += 1;
            return;
        }
        if message.bytes + text.len() > self.limits.max_message_bytes {
            let limit = self.limits.max_message_bytes;
            self.reject(key, AssemblyRejection::MessageTooLarge { limit }, out);
            return;
        }

        if self.held + text.len() > self.limits.max_buffered_bytes {
            let limit = self.limits.max_buffered_bytes;
            self.reject(key, AssemblyRejection::AssemblyFull { limit }, out);
            return;
        }

        message.bytes += text.len();
        self.held += text.len();
        message.parts.insert(meta.index, text);
        if message.parts.len() < message.total as usize {
            return;
        }

        let message = self.close(&key);
        self.recent.insert(key.clone());
        out.push(AssemblyEvent::Message(Message {
            message_id: key.message_id,
            sender: key.sender,
            parts: message.total,
            first_part_at: message.first_part_at,
            text: join(message.parts, message.bytes),
        }));
    }

    /// Drops every message older than [`AssemblyLimits::max_age`] at `now`, reporting each
    /// once as `message_expired`, in the order the messages were opened.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<AssemblyEvent>) {
        let max_age = self.limits.max_age;
        let mut expired: Vec<(u64, MessageKey)> = self
            .open
            .iter()
            .filter(|(_, message)| now >= message.first_part_at + max_age)
            .map(|(key, message)| (message.opened_seq, key.clone()))
            .collect();
        expired.sort_unstable_by_key(|(seq, _)| *seq);

        for (_, key) in expired {
            let message = &self.open[&key];
            let reason = AssemblyRejection::Expired {
                received: message.parts.len() as u32,
                total: message.total,
                max_age,
            };
            self.reject(key, reason, out);
        }
    }

    /// When [`expire`](Self::expire) next has something to do, if any message is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open
            .values()
            .map(|message| message.first_part_at + self.limits.max_age)
            .min()
    }

    /// Text bytes held in the parts of open messages. Zero when none is open.
    pub fn bytes_held(&self) -> usize {
        self.held
    }

    pub fn open_messages(&self) -> usize {
        self.open.len()
    }

    /// Counts of parts dropped without an event, since this was created.
    pub fn counters(&self) -> AssemblyCounters {
        self.counters
    }

    /// Drops the message's state if it has any, remembers it, and reports it.
    fn reject(&mut self, key: MessageKey, reason: AssemblyRejection, out: &mut Vec<AssemblyEvent>) {
        if self.open.contains_key(&key) {
            self.close(&key);
        }
        self.recent.insert(key.clone());
        tracing::debug!(
            message_id = %key.message_id,
            sender = %key.sender,
            reason = reason.reason(),
            error = %reason,
            "Message rejected",
        );
        out.push(AssemblyEvent::Rejected(MessageRejected {
            message_id: key.message_id,
            sender: key.sender,
            reason,
        }));
    }

    fn close(&mut self, key: &MessageKey) -> OpenMessage {
        let message = self
            .open
            .remove(key)
            .expect("caller checked the message is open");
        self.held -= message.bytes;
        message
    }
}

/// Reads `frame_meta`. On failure, returns the message id if one could be read, and why.
fn parse_frame_meta(raw: &str) -> Result<FrameMeta, (Option<String>, String)> {
    let value: Value = serde_json::from_str(raw).map_err(|error| (None, error.to_string()))?;
    let Value::Object(fields) = value else {
        return Err((None, "not a JSON object".to_owned()));
    };

    let message_id = match fields.get("message_id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_MESSAGE_ID_BYTES => id.clone(),
        Some(Value::String(id)) if id.is_empty() => {
            return Err((None, "message_id is empty".to_owned()));
        }
        Some(Value::String(_)) => {
            return Err((
                None,
                format!("message_id is longer than {MAX_MESSAGE_ID_BYTES} bytes"),
            ));
        }
        _ => return Err((None, "message_id is missing or not a string".to_owned())),
    };

    let read_u32 = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{name} is missing or not an integer in 0..=4294967295"))
    };
    let index = read_u32("frame_index").map_err(|error| (Some(message_id.clone()), error))?;
    let total = read_u32("total_frames").map_err(|error| (Some(message_id.clone()), error))?;
    if total == 0 {
        return Err((Some(message_id), "total_frames is 0".to_owned()));
    }

    Ok(FrameMeta {
        message_id,
        index,
        total,
    })
}

/// Joins parts in index order into one string of `bytes` bytes, reusing the first part's
/// allocation and freeing each part as it is copied.
fn join(parts: BTreeMap<u32, String>, bytes: usize) -> String {
    let mut parts = parts.into_values();
    let mut text = parts.next().unwrap_or_default();
    text.reserve_exact(bytes - text.len());
    for part in parts {
        text.push_str(&part);
    }
    text
}

/// A first-in, first-out set of the last `capacity` finished messages.
#[derive(Debug)]
struct RecentMessages {
    order: VecDeque<MessageKey>,
    members: HashSet<MessageKey>,
    capacity: usize,
}

impl RecentMessages {
    fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            members: HashSet::new(),
            capacity,
        }
    }

    fn contains(&self, key: &MessageKey) -> bool {
        self.members.contains(key)
    }

    fn insert(&mut self, key: MessageKey) {
        if self.capacity == 0 || self.members.contains(&key) {
            return;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.members.remove(&oldest);
        }
        self.members.insert(key.clone());
        self.order.push_back(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(sender: &str, message_id: &str, index: u32, total: u32, text: &str) -> TextStream {
        let meta = format!(
            r#"{{"message_id":"{message_id}","frame_index":{index},"total_frames":{total}}}"#
        );
        stream(sender, &format!("{message_id}-{index}"), Some(&meta), text)
    }

    fn stream(sender: &str, stream_id: &str, frame_meta: Option<&str>, text: &str) -> TextStream {
        TextStream {
            stream_id: stream_id.to_owned(),
            sender: sender.to_owned(),
            topic: "agentChat".to_owned(),
            attributes: frame_meta
                .map(|meta| HashMap::from([(FRAME_META_ATTRIBUTE.to_owned(), meta.to_owned())]))
                .unwrap_or_default(),
            text: text.to_owned(),
        }
    }

    fn feed(
        assembler: &mut Assembler,
        streams: Vec<TextStream>,
        now: Instant,
    ) -> Vec<AssemblyEvent> {
        let mut out = Vec::new();
        for stream in streams {
            assembler.push(stream, now, &mut out);
        }
        out
    }

    fn messages(events: &[AssemblyEvent]) -> Vec<(&str, &str, &str, u32)> {
        events
            .iter()
            .filter_map(|event| match event {
                AssemblyEvent::Message(m) => Some((
                    m.sender.as_str(),
                    m.message_id.as_str(),
                    m.text.as_str(),
                    m.parts,
                )),
                AssemblyEvent::Rejected(_) => None,
            })
            .collect()
    }

    fn rejections(events: &[AssemblyEvent]) -> Vec<(&str, &AssemblyRejection)> {
        events
            .iter()
            .filter_map(|event| match event {
                AssemblyEvent::Rejected(r) => Some((r.message_id.as_str(), &r.reason)),
                AssemblyEvent::Message(_) => None,
            })
            .collect()
    }

    fn labels(events: &[AssemblyEvent]) -> Vec<(&str, &'static str)> {
        rejections(events)
            .into_iter()
            .map(|(id, reason)| (id, reason.reason()))
            .collect()
    }

    #[test]
    fn a_stream_without_frame_meta_is_a_whole_message() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let now = Instant::now();
        let events = feed(&mut assembler, vec![stream("agent", "s1", None, "{}")], now);
        assert_eq!(
            events,
            [AssemblyEvent::Message(Message {
                message_id: "s1".into(),
                sender: "agent".into(),
                text: "{}".into(),
                parts: 1,
                first_part_at: now,
            })]
        );
        assert_eq!(assembler.open_messages(), 0);
        assert_eq!(assembler.bytes_held(), 0);
    }

    #[test]
    fn parts_are_joined_in_index_order_whatever_order_they_arrive_in() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let t0 = Instant::now();
        let mut events = feed(&mut assembler, vec![part("agent", "m1", 2, 3, "c")], t0);
        events.extend(feed(
            &mut assembler,
            vec![part("agent", "m1", 0, 3, "a")],
            t0,
        ));
        assert!(events.is_empty());
        assert_eq!(assembler.open_messages(), 1);
        assert_eq!(assembler.bytes_held(), 2);

        let later = t0 + Duration::from_secs(3);
        let events = feed(&mut assembler, vec![part("agent", "m1", 1, 3, "b")], later);
        assert_eq!(messages(&events), [("agent", "m1", "abc", 3)]);
        let AssemblyEvent::Message(message) = &events[0] else {
            unreachable!()
        };
        assert_eq!(message.first_part_at, t0);
        assert_eq!(assembler.open_messages(), 0);
        assert_eq!(assembler.bytes_held(), 0);
        assert_eq!(assembler.next_deadline(), None);
    }

    #[test]
    fn a_duplicate_part_is_counted_not_doubled() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let events = feed(
            &mut assembler,
            vec![
                part("agent", "m1", 0, 2, "first"),
                part("agent", "m1", 0, 2, "again"),
                part("agent", "m1", 1, 2, "-second"),
                part("agent", "m1", 1, 2, "-late copy"),
            ],
            Instant::now(),
        );
        assert_eq!(messages(&events), [("agent", "m1", "first-second", 2)]);
        assert_eq!(assembler.counters().duplicate_parts, 1);
        assert_eq!(assembler.counters().late_parts, 1);
    }

    #[test]
    fn a_message_with_a_missing_part_expires_once_after_max_age() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let t0 = Instant::now();
        feed(&mut assembler, vec![part("agent", "m1", 0, 3, "a")], t0);
        feed(
            &mut assembler,
            vec![part("agent", "m1", 2, 3, "c")],
            t0 + Duration::from_secs(5),
        );
        assert_eq!(
            assembler.next_deadline(),
            Some(t0 + Duration::from_secs(10))
        );

        let mut out = Vec::new();
        assembler.expire(t0 + Duration::from_millis(9_999), &mut out);
        assert!(out.is_empty());

        assembler.expire(t0 + Duration::from_secs(10), &mut out);
        assert_eq!(
            rejections(&out),
            [(
                "m1",
                &AssemblyRejection::Expired {
                    received: 2,
                    total: 3,
                    max_age: Duration::from_secs(10)
                }
            )]
        );
        assert_eq!(labels(&out), [("m1", "message_expired")]);
        assert_eq!(assembler.bytes_held(), 0);
        assert_eq!(assembler.open_messages(), 0);
        assert_eq!(assembler.next_deadline(), None);

        // The straggler does not reopen it, and nothing is reported twice.
        out.clear();
        let later = t0 + Duration::from_secs(11);
        out.extend(feed(
            &mut assembler,
            vec![part("agent", "m1", 1, 3, "b")],
            later,
        ));
        assembler.expire(t0 + Duration::from_secs(60), &mut out);
        assert!(out.is_empty());
        assert_eq!(assembler.open_messages(), 0);
        assert_eq!(assembler.counters().late_parts, 1);
    }

    #[test]
    fn a_billion_parts_is_refused_before_anything_is_stored() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let events = feed(
            &mut assembler,
            vec![
                part("agent", "huge", 0, 1_000_000_000, "x"),
                part("agent", "huge", 1, 1_000_000_000, "y"),
            ],
            Instant::now(),
        );
        assert_eq!(
            rejections(&events),
            [(
                "huge",
                &AssemblyRejection::TooManyParts {
                    total: 1_000_000_000,
                    limit: 64
                }
            )]
        );
        assert_eq!(labels(&events), [("huge", "too_many_parts")]);
        assert_eq!(assembler.open_messages(), 0);
        assert_eq!(assembler.bytes_held(), 0);
        assert_eq!(assembler.counters().late_parts, 1);
    }

    #[test]
    fn the_largest_allowed_part_count_stores_only_parts_received() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let events = feed(
            &mut assembler,
            vec![part("agent", "m", 63, 64, "last")],
            Instant::now(),
        );
        assert!(events.is_empty());
        assert_eq!(assembler.open_messages(), 1);
        assert_eq!(assembler.bytes_held(), 4);
        assert_eq!(
            assembler.open[&MessageKey {
                sender: "agent".into(),
                message_id: "m".into()
            }]
                .parts
                .len(),
            1
        );
    }

    #[test]
    fn malformed_frame_meta_is_rejected_with_a_reason() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let long_id = "x".repeat(MAX_MESSAGE_ID_BYTES + 1);
        let long = format!(r#"{{"message_id":"{long_id}","frame_index":0,"total_frames":2}}"#);
        let cases = [
            ("not-json", "{nope"),
            ("array", "[1,2]"),
            ("no-id", r#"{"frame_index":0,"total_frames":2}"#),
            (
                "number-id",
                r#"{"message_id":7,"frame_index":0,"total_frames":2}"#,
            ),
            ("long-id", long.as_str()),
            (
                "negative",
                r#"{"message_id":"neg","frame_index":-1,"total_frames":2}"#,
            ),
            (
                "fraction",
                r#"{"message_id":"frac","frame_index":0.5,"total_frames":2}"#,
            ),
            (
                "too-big",
                r#"{"message_id":"big","frame_index":0,"total_frames":4294967296}"#,
            ),
            (
                "zero",
                r#"{"message_id":"zero","frame_index":0,"total_frames":0}"#,
            ),
        ];
        let streams = cases
            .iter()
            .map(|(id, meta)| stream("agent", id, Some(meta), "text"))
            .collect();

        let events = feed(&mut assembler, streams, Instant::now());

        // Each is named by its message id when one could be read, else by its stream id.
        assert_eq!(
            labels(&events),
            [
                ("not-json", "bad_frame_meta"),
                ("array", "bad_frame_meta"),
                ("no-id", "bad_frame_meta"),
                ("number-id", "bad_frame_meta"),
                ("long-id", "bad_frame_meta"),
                ("neg", "bad_frame_meta"),
                ("frac", "bad_frame_meta"),
                ("big", "bad_frame_meta"),
                ("zero", "bad_frame_meta"),
            ]
        );
        let AssemblyRejection::BadFrameMeta(why) = rejections(&events)[8].1 else {
            panic!("expected bad_frame_meta");
        };
        assert_eq!(why, "total_frames is 0");
        assert_eq!(assembler.open_messages(), 0);
    }

    #[test]
    fn a_part_index_out_of_range_drops_the_message() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let events = feed(
            &mut assembler,
            vec![
                part("agent", "m1", 0, 2, "a"),
                part("agent", "m1", 2, 2, "c"),
                part("agent", "m1", 1, 2, "b"),
            ],
            Instant::now(),
        );
        assert_eq!(
            rejections(&events),
            [(
                "m1",
                &AssemblyRejection::PartIndexOutOfRange { index: 2, total: 2 }
            )]
        );
        assert!(messages(&events).is_empty());
        assert_eq!(assembler.bytes_held(), 0);
        assert_eq!(assembler.counters().late_parts, 1);
    }

    #[test]
    fn parts_disagreeing_on_the_total_drop_the_message() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let events = feed(
            &mut assembler,
            vec![
                part("agent", "m1", 0, 3, "a"),
                part("agent", "m1", 1, 4, "b"),
                part("agent", "m1", 2, 3, "c"),
            ],
            Instant::now(),
        );
        assert_eq!(
            rejections(&events),
            [(
                "m1",
                &AssemblyRejection::InconsistentTotal { first: 3, later: 4 }
            )]
        );
        assert_eq!(labels(&events), [("m1", "inconsistent_total")]);
        assert_eq!(assembler.open_messages(), 0);
        assert_eq!(assembler.bytes_held(), 0);
    }

    #[test]
    fn a_message_growing_past_its_cap_is_dropped_and_freed() {
        let mut assembler = Assembler::new(AssemblyLimits {
            max_message_bytes: 10,
            ..AssemblyLimits::default()
        });
        let events = feed(
            &mut assembler,
            vec![
                part("agent", "m1", 0, 2, "123456"),
                part("agent", "m1", 1, 2, "78901"),
                part("agent", "ok", 0, 2, "12345"),
                part("agent", "ok", 1, 2, "67890"),
                stream("agent", "single", None, "12345678901"),
            ],
            Instant::now(),
        );
        assert_eq!(
            rejections(&events),
            [
                ("m1", &AssemblyRejection::MessageTooLarge { limit: 10 }),
                ("single", &AssemblyRejection::MessageTooLarge { limit: 10 }),
            ]
        );
        assert_eq!(messages(&events), [("agent", "ok", "1234567890", 2)]);
        assert_eq!(assembler.bytes_held(), 0);
    }

    #[test]
    fn a_new_message_past_the_open_cap_is_refused_once_and_the_open_ones_kept() {
        let mut assembler = Assembler::new(AssemblyLimits {
            max_open_messages: 2,
            ..AssemblyLimits::default()
        });
        let events = feed(
            &mut assembler,
            vec![
                part("agent", "m1", 0, 2, "a"),
                part("agent", "m2", 0, 2, "c"),
                part("agent", "m3", 0, 2, "e"),
                part("agent", "m3", 1, 2, "f"),
                // One-part messages need no slot.
                stream("agent", "single", None, "s"),
                part("agent", "m1", 1, 2, "b"),
                part("agent", "m2", 1, 2, "d"),
            ],
            Instant::now(),
        );
        assert_eq!(
            rejections(&events),
            [("m3", &AssemblyRejection::TooManyOpenMessages { limit: 2 })]
        );
        assert_eq!(
            messages(&events),
            [
                ("agent", "single", "s", 1),
                ("agent", "m1", "ab", 2),
                ("agent", "m2", "cd", 2)
            ]
        );
        assert_eq!(assembler.counters().late_parts, 1);
    }

    #[test]
    fn open_messages_together_hold_at_most_the_buffered_cap() {
        let mut assembler = Assembler::new(AssemblyLimits {
            max_buffered_bytes: 10,
            ..AssemblyLimits::default()
        });
        let events = feed(
            &mut assembler,
            vec![
                part("agent", "m1", 0, 2, "123456"),
                // Would make 11 bytes held: m2 goes, m1 stays.
                part("agent", "m2", 0, 2, "abcde"),
                part("agent", "m2", 1, 2, "f"),
                part("agent", "m1", 1, 2, "7890"),
                // One-part messages are never held.
                stream("agent", "single", None, "a long one-part message"),
            ],
            Instant::now(),
        );
        assert_eq!(
            rejections(&events),
            [("m2", &AssemblyRejection::AssemblyFull { limit: 10 })]
        );
        assert_eq!(
            messages(&events),
            [
                ("agent", "m1", "1234567890", 2),
                ("agent", "single", "a long one-part message", 1)
            ]
        );
        assert_eq!(assembler.counters().late_parts, 1);
        assert_eq!(assembler.bytes_held(), 0);
    }

    #[test]
    fn two_senders_with_the_same_message_id_are_kept_apart() {
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let events = feed(
            &mut assembler,
            vec![
                part("alice", "m", 0, 2, "alice-0 "),
                part("bob", "m", 1, 2, "bob-1"),
                part("bob", "m", 0, 2, "bob-0 "),
                part("alice", "m", 1, 2, "alice-1"),
            ],
            Instant::now(),
        );
        assert_eq!(
            messages(&events),
            [
                ("bob", "m", "bob-0 bob-1", 2),
                ("alice", "m", "alice-0 alice-1", 2)
            ]
        );
    }

    #[test]
    fn only_the_last_finished_messages_are_remembered() {
        let mut assembler = Assembler::new(AssemblyLimits {
            remembered_messages: 2,
            ..AssemblyLimits::default()
        });
        let now = Instant::now();
        for id in ["m1", "m2", "m3"] {
            let events = feed(
                &mut assembler,
                vec![part("agent", id, 0, 2, "a"), part("agent", id, 1, 2, "b")],
                now,
            );
            assert_eq!(messages(&events).len(), 1);
        }

        // m3 and m2 are remembered: their stragglers are counted.
        feed(&mut assembler, vec![part("agent", "m3", 0, 2, "a")], now);
        feed(&mut assembler, vec![part("agent", "m2", 1, 2, "b")], now);
        assert_eq!(assembler.counters().late_parts, 2);
        assert_eq!(assembler.open_messages(), 0);

        // m1 was forgotten: its straggler opens a new message, which will expire.
        feed(&mut assembler, vec![part("agent", "m1", 0, 2, "a")], now);
        assert_eq!(assembler.open_messages(), 1);
    }

    #[test]
    fn parts_sent_as_livekit_streams_come_back_as_one_message() {
        use crate::streams::{
            DataStreams, SendTextOptions, StreamEvent, StreamLimits, text_stream_packets,
        };

        // A 100 kB message in three parts, the middle one with multi-byte characters.
        let parts = [
            "{\"detections\":[".repeat(2_000),
            "\"é😀\",".repeat(5_000),
            "]}".repeat(10_000),
        ];
        let whole = parts.concat();
        let mut packets = Vec::new();
        for index in [2usize, 0, 1] {
            let meta =
                format!(r#"{{"message_id":"msg-1","frame_index":{index},"total_frames":3}}"#);
            let attributes = HashMap::from([(FRAME_META_ATTRIBUTE.to_owned(), meta)]);
            let sent = text_stream_packets(
                &parts[index],
                "agentChat",
                attributes,
                "vision",
                &SendTextOptions::default(),
            )
            .unwrap();
            packets.extend(sent);
        }

        let now = Instant::now();
        let mut streams = DataStreams::new(StreamLimits::default());
        let mut stream_events = Vec::new();
        for packet in packets {
            streams.push(packet, now, &mut stream_events);
        }
        let mut assembler = Assembler::new(AssemblyLimits::default());
        let mut out = Vec::new();
        for event in stream_events {
            let StreamEvent::Text(text) = event else {
                panic!("unexpected {event:?}");
            };
            assembler.push(text, now, &mut out);
        }

        assert_eq!(messages(&out), [("vision", "msg-1", whole.as_str(), 3)]);
        assert_eq!(streams.bytes_held() + assembler.bytes_held(), 0);
    }
}
