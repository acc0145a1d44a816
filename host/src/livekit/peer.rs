//! The subscriber peer connection: one str0m [`Rtc`] and the UDP socket it talks through.
//!
//! str0m is sans-IO: it never touches a socket or a clock. [`Peer::io`] gives it one input
//! (a datagram or a timeout), sends what it wants sent and keeps what it reports, so the
//! session's loop decides when the peer runs and nothing here spawns a task.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;

/// The data channel a LiveKit server sends reliable data packets on.
pub const RELIABLE_LABEL: &str = "_reliable";

/// Largest datagram read. Above any path MTU, so nothing arrives truncated.
const DATAGRAM_BYTES: usize = 2048;

/// Largest offer taken. A data-only subscriber offer is one or two KiB.
pub const MAX_OFFER_BYTES: usize = 64 << 10;

/// Candidates kept from an offer.
pub const MAX_OFFER_CANDIDATES: usize = 32;

/// Datagrams already waiting that one [`Peer::io`] takes after the one it waited for.
const RECEIVE_BATCH: usize = 64;

/// What the peer reports to the session.
#[derive(Debug)]
pub enum PeerEvent {
    /// A message on `_reliable`: one encoded `DataPacket`.
    Reliable(Vec<u8>),
    /// `_reliable` is open; data can flow.
    ReliableOpen,
    /// A message on another channel (`_lossy`, `_data_track`): counted, not used.
    Ignored,
    Ice(IceConnectionState),
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("UDP socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("WebRTC: {0}")]
    Rtc(#[from] str0m::RtcError),
    #[error("bad SDP from the server: {0}")]
    Sdp(String),
    #[error("bad ICE candidate from the server: {0}")]
    Candidate(String),
}

pub struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    candidate: Candidate,
    reliable: Option<ChannelId>,
    events: Vec<PeerEvent>,
    buf: Vec<u8>,
}

impl Peer {
    /// Binds a UDP socket on the interface the kernel routes toward `server` through, and
    /// makes a peer with that one host candidate.
    ///
    /// A data-only subscriber needs no STUN or TURN: it sends the connectivity checks
    /// itself, and a server behind any NAT learns the address they come from.
    pub async fn bind(server: IpAddr) -> Result<Self, PeerError> {
        super::install_crypto();
        let local_ip = route_to(server).await?;
        let socket = bind_udp(SocketAddr::new(local_ip, 0))?;
        let local = socket.local_addr()?;
        let candidate = Candidate::host(local, "udp")
            .map_err(|e| PeerError::Candidate(format!("local {local}: {e}")))?;
        let mut rtc = RtcConfig::new().build(Instant::now());
        rtc.add_local_candidate(candidate.clone())
            .ok_or_else(|| PeerError::Candidate(format!("local {local} refused")))?;
        Ok(Self {
            rtc,
            socket,
            local,
            candidate,
            reliable: None,
            events: Vec::new(),
            buf: vec![0; DATAGRAM_BYTES],
        })
    }

    /// Our candidate, as the `candidate:` line a trickle carries.
    pub fn local_candidate(&self) -> String {
        self.candidate.to_sdp_string()
    }

    /// Answers the server's offer. A second offer (after a resume) with new ICE credentials
    /// restarts ICE; DTLS, SCTP and the open channels carry on.
    ///
    /// Bounded before it is parsed: at most [`MAX_OFFER_BYTES`], at most
    /// [`MAX_OFFER_CANDIDATES`] candidates kept (str0m's cost per candidate grows with the
    /// candidates it has), and it must carry a data-channel section.
    pub fn accept_offer(&mut self, sdp: &str) -> Result<String, PeerError> {
        if sdp.len() > MAX_OFFER_BYTES {
            return Err(PeerError::Sdp(format!(
                "the offer is {} bytes; a data-only offer is a few KiB (at most {MAX_OFFER_BYTES})",
                sdp.len()
            )));
        }
        if !sdp.lines().any(|line| line.starts_with("m=application")) {
            return Err(PeerError::Sdp(
                "the offer has no data-channel (m=application) section".into(),
            ));
        }
        let mut candidates = 0;
        let sdp: String = sdp
            .split_inclusive('\n')
            .filter(|line| {
                if !line.starts_with("a=candidate") {
                    return true;
                }
                candidates += 1;
                candidates <= MAX_OFFER_CANDIDATES
            })
            .collect();
        if candidates > MAX_OFFER_CANDIDATES {
            tracing::warn!(
                candidates,
                kept = MAX_OFFER_CANDIDATES,
                "The server's offer lists too many ICE candidates; keeping the first ones"
            );
        }
        let offer = SdpOffer::from_sdp_string(&sdp).map_err(|e| PeerError::Sdp(short(&e)))?;
        let answer: SdpAnswer = self.rtc.sdp_api().accept_offer(offer)?;
        Ok(answer.to_sdp_string())
    }

    /// Adds a candidate the server trickled (`candidate:...`, with or without the prefix).
    pub fn add_remote_candidate(&mut self, line: &str) -> Result<(), PeerError> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(());
        }
        let line = if line.starts_with("candidate:") {
            line.to_owned()
        } else {
            format!("candidate:{line}")
        };
        let candidate =
            Candidate::from_sdp_string(&line).map_err(|e| PeerError::Candidate(e.to_string()))?;
        self.rtc.add_remote_candidate(candidate);
        Ok(())
    }

    pub fn reliable_open(&self) -> bool {
        self.reliable.is_some()
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> std::vec::Drain<'_, PeerEvent> {
        self.events.drain(..)
    }

    /// Waits for one datagram or the peer's next timer, feeds it in, and sends what comes
    /// out. Cancel-safe: dropped before anything arrived, it has changed nothing.
    pub async fn io(&mut self) -> Result<(), PeerError> {
        let deadline = self.flush()?;
        let received = tokio::select! {
            received = self.socket.recv_from(&mut self.buf) => Some(received?),
            _ = tokio::time::sleep_until(deadline.into()) => None,
        };
        let Some((len, source)) = received else {
            self.rtc.handle_input(Input::Timeout(Instant::now()))?;
            self.flush()?;
            return Ok(());
        };
        self.receive(len, source)?;
        // Datagrams come in bursts: take what is already waiting before going back to the
        // runtime, rather than one wake-up per datagram.
        for _ in 0..RECEIVE_BATCH {
            match self.socket.try_recv_from(&mut self.buf) {
                Ok((len, source)) => self.receive(len, source)?,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Feeds one datagram in and sends what comes out.
    fn receive(&mut self, len: usize, source: SocketAddr) -> Result<(), PeerError> {
        let Ok(contents) = self.buf[..len].try_into() else {
            // Not STUN, DTLS or RTP: a stray datagram, not the peer's problem.
            tracing::debug!(%source, len, "Ignoring a datagram that is not WebRTC");
            return Ok(());
        };
        self.rtc.handle_input(Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        ))?;
        self.flush()?;
        Ok(())
    }

    /// Runs the peer's output until it asks to wait; returns until when.
    fn flush(&mut self) -> Result<Instant, PeerError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(at) => return Ok(at),
                Output::Transmit(transmit) => {
                    // UDP may drop; a full socket buffer is just that. ICE and SCTP resend.
                    let _ = self
                        .socket
                        .try_send_to(&transmit.contents, transmit.destination);
                }
                Output::Event(event) => self.event(event),
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::ChannelOpen(id, label) => {
                if label == RELIABLE_LABEL {
                    self.reliable = Some(id);
                    self.events.push(PeerEvent::ReliableOpen);
                } else {
                    tracing::debug!(%label, "Ignoring data channel");
                }
            }
            Event::ChannelData(data) => {
                if Some(data.id) == self.reliable {
                    self.events.push(PeerEvent::Reliable(data.data));
                } else {
                    self.events.push(PeerEvent::Ignored);
                }
            }
            Event::ChannelClose(id) if Some(id) == self.reliable => self.reliable = None,
            Event::IceConnectionStateChange(state) => self.events.push(PeerEvent::Ice(state)),
            _ => {}
        }
    }
}

/// Receive buffer asked for the peer's socket. A server sends a congestion window's worth
/// of datagrams in one burst; the kernel's default buffer (about 208 KiB on Linux) overflows
/// under a burst of large frames while the loop is busy, and every datagram lost there makes
/// SCTP retransmit and halve its window. The kernel caps the request at `net.core.rmem_max`.
const RECEIVE_BUFFER_BYTES: usize = 4 << 20;

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Err(error) = socket.set_recv_buffer_size(RECEIVE_BUFFER_BYTES) {
        tracing::debug!(%error, "Cannot enlarge the UDP receive buffer");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The first line of a parser's error, without the addresses some of them print: it goes
/// into job statuses.
fn short(error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    let first = text.lines().next().unwrap_or_default();
    let first = match first.find(" at PointerOffset") {
        Some(at) => &first[..at],
        None => first,
    };
    first.chars().take(200).collect()
}

/// The local address the kernel would send from toward `server`. Connecting a UDP socket
/// sends nothing; it only picks the route.
async fn route_to(server: IpAddr) -> std::io::Result<IpAddr> {
    let unspecified: IpAddr = if server.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let probe = UdpSocket::bind(SocketAddr::new(unspecified, 0)).await?;
    probe.connect(SocketAddr::new(server, 9)).await?;
    Ok(probe.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn offers_are_bounded_before_they_are_parsed() {
        let mut peer = Peer::bind("127.0.0.1".parse().unwrap()).await.unwrap();
        let no_data = peer
            .accept_offer("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n")
            .unwrap_err();
        assert!(no_data.to_string().contains("m=application"), "{no_data}");
        let huge = format!(
            "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n{}",
            "a=candidate:1 1 udp 1 10.0.0.1 9 typ host\r\n".repeat(5_000)
        );
        let too_big = peer.accept_offer(&huge).unwrap_err();
        assert!(too_big.to_string().contains("bytes"), "{too_big}");
        let garbage = peer
            .accept_offer("m=application\r\nnot sdp at all\r\n")
            .unwrap_err();
        assert!(!garbage.to_string().contains('\n'), "one line: {garbage}");
    }
}
