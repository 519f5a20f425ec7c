//! Endpoints: one side of a mux session, with AF_VSOCK-like streams.
//!
//! Threads: a supervisor per endpoint asks the [`LinkSource`] for links and
//! runs the writer loop of each; a reader thread per link decodes frames.
//! All state sits behind one mutex; the reader never waits for an
//! application, so a stream whose consumer stalls only stops its own sender
//! (through its credit window), never the link.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::MuxError;
use crate::frame::{
    encode_into, get_u32, get_u64, Frame, FrameDecoder, FrameType, MAX_PAYLOAD, SYNC_PADDING,
};
use crate::link::{Link, LinkSource, StopSignal, VirtioPortSource};
use crate::sys::random_u64;

/// Version spoken in HELLO; a guest ignores HELLOs of other versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes the writer gathers before one `write` to the link.
const BATCH_BYTES: usize = 256 * 1024;

/// Queued frames beyond which answers the peer provoked (PONG, refusals)
/// are dropped. Data is bounded by credit, but a peer that floods PINGs or
/// OPENs while not reading our replies could otherwise grow the queue
/// without limit.
const MAX_QUEUED_REPLIES: usize = 16 * 1024;

/// Tunables of an endpoint. The defaults suit both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Per-stream receive window (credit) in bytes: the most a peer may send
    /// on one stream before we consume it. Bounds memory per stream.
    pub window: u32,
    /// How long `connect` waits for a session and then for the peer's answer.
    pub connect_timeout: Duration,
    /// Host: how often HELLO is repeated until acknowledged.
    pub hello_interval: Duration,
    /// Guest: how often NEED_HELLO is repeated while there is no session.
    pub need_hello_interval: Duration,
    /// Accepted-but-not-yet-`accept()`ed streams per listener; further
    /// OPENs are refused, like a full listen backlog.
    pub backlog: usize,
    /// Most streams alive at once (opening, open, or waiting to be
    /// accepted); further OPENs from the peer are refused. Bounds the memory
    /// and threads a misbehaving peer can make us spend. Firecracker's limit
    /// is similar (1023 connections per device).
    pub max_streams: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            window: 256 * 1024,
            connect_timeout: Duration::from_secs(3),
            hello_interval: Duration::from_millis(200),
            need_hello_interval: Duration::from_millis(500),
            backlog: 128,
            max_streams: 1024,
        }
    }
}

/// Which side of the session an endpoint plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Starts sessions with HELLO; opens even stream ids.
    Host,
    /// Answers HELLO; opens odd stream ids.
    Guest,
}

/// Counters for diagnostics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Links obtained from the link source.
    pub links: u64,
    /// Sessions established (HELLO acknowledged).
    pub sessions: u64,
    /// Established sessions that ended, resetting their streams.
    pub session_resets: u64,
    /// Bytes the decoder skipped as not belonging to a valid frame.
    pub garbage_bytes: u64,
    /// Valid frames that broke the protocol (and were ignored).
    pub protocol_errors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    /// No session: host without a link; guest waiting for HELLO.
    Down,
    /// Host sent HELLO(nonce) and waits for the matching HELLO_ACK.
    Handshaking(u64),
    /// Established.
    Up(u64),
}

struct Out {
    kind: FrameType,
    stream: u32,
    payload: Vec<u8>,
    pad: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// We sent OPEN and wait for OPEN_OK / OPEN_REFUSED.
    Opening,
    /// Peer sent OPEN; the bridge has not decided yet.
    Pending,
    Open,
    Refused,
}

struct Slot {
    phase: Phase,
    recv: VecDeque<Vec<u8>>,
    recv_off: usize,
    recv_len: usize,
    /// Consumed bytes not yet returned to the peer as credit.
    unacked: usize,
    send_credit: u64,
    fin_rx: bool,
    fin_tx: bool,
    rst_rx: bool,
    /// Live handles (clones, plus a listener backlog or pending-open entry).
    handles: usize,
    cv: Arc<Condvar>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl Slot {
    fn new(phase: Phase, send_credit: u64) -> Self {
        Self {
            phase,
            recv: VecDeque::new(),
            recv_off: 0,
            recv_len: 0,
            unacked: 0,
            send_credit,
            fin_rx: false,
            fin_tx: false,
            rst_rx: false,
            handles: 1,
            cv: Arc::new(Condvar::new()),
            read_timeout: None,
            write_timeout: None,
        }
    }
}

struct ListenerSlot {
    backlog: VecDeque<u32>,
    cv: Arc<Condvar>,
}

struct Core {
    /// Bumped whenever a session ends; handles from older epochs are dead.
    epoch: u64,
    session: Session,
    closed: bool,
    link_gen: u64,
    link_alive: bool,
    closer: Option<Arc<dyn Fn() + Send + Sync>>,
    streams: HashMap<u32, Slot>,
    listeners: HashMap<u32, ListenerSlot>,
    accept_any: bool,
    incoming: VecDeque<(u32, u32)>,
    queue: VecDeque<Out>,
    next_id: u32,
    next_ping: u64,
    pings: HashMap<u64, bool>,
    need_hello_due: Instant,
    stats: EndpointStats,
}

pub(crate) struct Inner {
    role: Role,
    cfg: EndpointConfig,
    core: Mutex<Core>,
    /// Wakes the writer: frames queued, session changed, link died.
    writer_cv: Condvar,
    /// Wakes waiters on session state, pongs and pending incoming opens.
    session_cv: Condvar,
    stop: StopSignal,
}

fn wait<'a>(
    cv: &Condvar,
    g: MutexGuard<'a, Core>,
    deadline: Option<Instant>,
) -> (MutexGuard<'a, Core>, bool) {
    match deadline {
        None => (cv.wait(g).unwrap_or_else(PoisonError::into_inner), false),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                return (g, true);
            }
            let (g, r) = cv
                .wait_timeout(g, d - now)
                .unwrap_or_else(PoisonError::into_inner);
            (g, r.timed_out() && Instant::now() >= d)
        }
    }
}

fn gone(closed: bool) -> io::Error {
    if closed {
        MuxError::Closed.into()
    } else {
        MuxError::Reset.into()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, core: &mut Core, kind: FrameType, stream: u32, payload: Vec<u8>) {
        core.queue.push_back(Out {
            kind,
            stream,
            payload,
            pad: false,
        });
        self.writer_cv.notify_one();
    }

    /// Queues an answer to something the peer sent, unless the queue is
    /// already absurdly long (see [`MAX_QUEUED_REPLIES`]).
    fn push_reply(&self, core: &mut Core, kind: FrameType, stream: u32, payload: Vec<u8>) {
        if core.queue.len() >= MAX_QUEUED_REPLIES {
            core.stats.protocol_errors += 1;
            return;
        }
        self.push(core, kind, stream, payload);
    }

    /// Ends the current session's streams: every handle of them now fails.
    fn reset_session(&self, core: &mut Core) {
        core.epoch += 1;
        for slot in core.streams.values() {
            slot.cv.notify_all();
        }
        core.streams.clear();
        for l in core.listeners.values_mut() {
            l.backlog.clear();
            l.cv.notify_all();
        }
        core.incoming.clear();
        core.queue.clear();
        core.pings.clear();
        if matches!(core.session, Session::Up(_)) {
            core.stats.session_resets += 1;
        }
        self.session_cv.notify_all();
        self.writer_cv.notify_all();
    }

    /// Host: drop the session and start a new handshake on the same link.
    fn restart(&self, core: &mut Core) {
        self.reset_session(core);
        core.session = Session::Handshaking(random_u64());
    }

    fn link_down(&self, core: &mut Core, gen: u64) {
        if core.link_gen != gen || !core.link_alive {
            return;
        }
        core.link_alive = false;
        self.reset_session(core);
        core.session = Session::Down;
        if let Some(c) = core.closer.take() {
            c();
        }
    }

    fn shutdown(&self) {
        let mut core = self.lock();
        if !core.closed {
            core.closed = true;
            self.reset_session(&mut core);
            core.session = Session::Down;
            core.link_alive = false;
            if let Some(c) = core.closer.take() {
                c();
            }
        }
        drop(core);
        self.stop.stop();
    }

    fn alloc_id(&self, core: &mut Core) -> u32 {
        loop {
            let id = core.next_id;
            // Adding 2 keeps the parity that separates host and guest ids,
            // also across the u32 wrap.
            core.next_id = core.next_id.wrapping_add(2);
            if id != 0 && !core.streams.contains_key(&id) {
                return id;
            }
        }
    }

    /// Removes a stream whose last handle went away, telling the peer.
    fn close_slot(&self, core: &mut Core, id: u32) {
        let Some(slot) = core.streams.remove(&id) else {
            return;
        };
        slot.cv.notify_all();
        match slot.phase {
            Phase::Opening => self.push(core, FrameType::Rst, id, Vec::new()),
            Phase::Pending => {
                if !slot.rst_rx {
                    self.push(core, FrameType::OpenRefused, id, Vec::new());
                }
            }
            Phase::Open => {
                if !(slot.rst_rx || slot.fin_tx && slot.fin_rx) {
                    // Like close(2) on a vsock: the peer reads what we sent,
                    // then EOF; its further writes fail.
                    if !slot.fin_tx {
                        self.push(core, FrameType::Fin, id, Vec::new());
                    }
                    self.push(core, FrameType::Rst, id, Vec::new());
                }
            }
            Phase::Refused => {}
        }
    }

    fn release(&self, id: u32, epoch: u64) {
        let mut core = self.lock();
        if core.epoch != epoch {
            return;
        }
        let remove = match core.streams.get_mut(&id) {
            Some(slot) => {
                slot.handles = slot.handles.saturating_sub(1);
                slot.handles == 0
            }
            None => false,
        };
        if remove {
            self.close_slot(&mut core, id);
        }
    }

    fn peer_id_ok(&self, id: u32) -> bool {
        match self.role {
            Role::Guest => id != 0 && id & 1 == 0,
            Role::Host => id & 1 == 1,
        }
    }

    fn on_garbage(&self, core: &mut Core, all: u64, nonzero: u64) {
        core.stats.garbage_bytes += all;
        // Zero bytes are session padding and expected at any time; anything
        // else inside a session means bytes were lost or mangled, so no stream
        // of this session can be trusted any more.
        if nonzero == 0 || !matches!(core.session, Session::Up(_)) {
            return;
        }
        match self.role {
            Role::Host => self.restart(core),
            Role::Guest => {
                self.reset_session(core);
                core.session = Session::Down;
                core.need_hello_due = Instant::now();
            }
        }
    }

    fn on_frame(&self, core: &mut Core, f: Frame) {
        let Some(kind) = f.frame_type() else {
            // A frame type from a newer peer: skippable by design.
            core.stats.protocol_errors += 1;
            return;
        };
        match (self.role, core.session, kind) {
            (Role::Guest, _, FrameType::Hello) => {
                let (Some(nonce), Some(version)) = (get_u64(&f.payload, 0), get_u32(&f.payload, 8))
                else {
                    core.stats.protocol_errors += 1;
                    return;
                };
                if version != PROTOCOL_VERSION {
                    core.stats.protocol_errors += 1;
                    return;
                }
                if core.session != Session::Up(nonce) {
                    self.reset_session(core);
                    core.session = Session::Up(nonce);
                    core.stats.sessions += 1;
                }
                // Acknowledge every copy: the host repeats HELLO until one
                // ACK gets through, and an ACK may be what was lost.
                core.queue.push_back(Out {
                    kind: FrameType::HelloAck,
                    stream: 0,
                    payload: nonce.to_le_bytes().to_vec(),
                    pad: true,
                });
                self.writer_cv.notify_one();
                self.session_cv.notify_all();
            }
            (Role::Host, Session::Handshaking(n), FrameType::HelloAck)
                if get_u64(&f.payload, 0) == Some(n) =>
            {
                core.session = Session::Up(n);
                core.stats.sessions += 1;
                self.writer_cv.notify_all();
                self.session_cv.notify_all();
            }
            (Role::Host, Session::Up(_), FrameType::NeedHello) => self.restart(core),
            (_, Session::Up(_), _) => self.on_stream_frame(core, kind, f),
            // Outside a session only the handshake matters; the rest is what
            // the previous session left in flight.
            _ => {}
        }
    }

    fn on_stream_frame(&self, core: &mut Core, kind: FrameType, f: Frame) {
        let id = f.stream;
        match kind {
            FrameType::Hello | FrameType::HelloAck | FrameType::NeedHello => {}
            FrameType::Ping => {
                if f.payload.len() == 8 {
                    self.push_reply(core, FrameType::Pong, 0, f.payload);
                } else {
                    core.stats.protocol_errors += 1;
                }
            }
            FrameType::Pong => {
                if let Some(token) = get_u64(&f.payload, 0) {
                    if let Some(answered) = core.pings.get_mut(&token) {
                        *answered = true;
                        self.session_cv.notify_all();
                    }
                }
            }
            FrameType::Open => {
                let (Some(port), Some(window)) = (get_u32(&f.payload, 0), get_u32(&f.payload, 4))
                else {
                    core.stats.protocol_errors += 1;
                    return;
                };
                if !self.peer_id_ok(id) || core.streams.contains_key(&id) {
                    core.stats.protocol_errors += 1;
                    return;
                }
                if core.streams.len() >= self.cfg.max_streams {
                    self.push_reply(core, FrameType::OpenRefused, id, Vec::new());
                    return;
                }
                let backlog_max = self.cfg.backlog;
                if let Some(l) = core.listeners.get_mut(&port) {
                    if l.backlog.len() >= backlog_max {
                        self.push_reply(core, FrameType::OpenRefused, id, Vec::new());
                        return;
                    }
                    l.backlog.push_back(id);
                    l.cv.notify_one();
                    core.streams
                        .insert(id, Slot::new(Phase::Open, window as u64));
                    let w = self.cfg.window;
                    self.push(core, FrameType::OpenOk, id, w.to_le_bytes().to_vec());
                } else if core.accept_any {
                    core.streams
                        .insert(id, Slot::new(Phase::Pending, window as u64));
                    core.incoming.push_back((id, port));
                    self.session_cv.notify_all();
                } else {
                    self.push_reply(core, FrameType::OpenRefused, id, Vec::new());
                }
            }
            FrameType::OpenOk => {
                let Some(window) = get_u32(&f.payload, 0) else {
                    core.stats.protocol_errors += 1;
                    return;
                };
                match core.streams.get_mut(&id) {
                    Some(slot) if slot.phase == Phase::Opening => {
                        slot.phase = Phase::Open;
                        slot.send_credit = window as u64;
                        slot.cv.notify_all();
                    }
                    Some(_) => core.stats.protocol_errors += 1,
                    None => {}
                }
            }
            FrameType::OpenRefused => match core.streams.get_mut(&id) {
                Some(slot) if slot.phase == Phase::Opening => {
                    slot.phase = Phase::Refused;
                    slot.cv.notify_all();
                }
                Some(_) => core.stats.protocol_errors += 1,
                None => {}
            },
            FrameType::Data => {
                let window = self.cfg.window as usize;
                let Some(slot) = core.streams.get_mut(&id) else {
                    return;
                };
                if slot.phase != Phase::Open || slot.fin_rx || slot.rst_rx {
                    core.stats.protocol_errors += 1;
                    return;
                }
                if f.payload.is_empty() {
                    return;
                }
                if slot.recv_len + f.payload.len() > window {
                    // The peer ignored our credit: this stream cannot be
                    // trusted, but the others can.
                    slot.rst_rx = true;
                    slot.cv.notify_all();
                    core.stats.protocol_errors += 1;
                    self.push(core, FrameType::Rst, id, Vec::new());
                    return;
                }
                slot.recv_len += f.payload.len();
                slot.recv.push_back(f.payload);
                slot.cv.notify_all();
            }
            FrameType::Window => {
                let Some(inc) = get_u32(&f.payload, 0) else {
                    core.stats.protocol_errors += 1;
                    return;
                };
                if let Some(slot) = core.streams.get_mut(&id) {
                    slot.send_credit = slot.send_credit.saturating_add(inc as u64);
                    slot.cv.notify_all();
                }
            }
            FrameType::Fin => {
                if let Some(slot) = core.streams.get_mut(&id) {
                    slot.fin_rx = true;
                    slot.cv.notify_all();
                }
            }
            FrameType::Rst => {
                if let Some(slot) = core.streams.get_mut(&id) {
                    slot.rst_rx = true;
                    if slot.phase == Phase::Opening {
                        slot.phase = Phase::Refused;
                    }
                    slot.cv.notify_all();
                }
            }
        }
    }

    fn supervise(self: Arc<Self>, mut source: Box<dyn LinkSource>) {
        loop {
            if self.lock().closed {
                break;
            }
            let link = match source.next_link(&self.stop) {
                Ok(Some(l)) => l,
                Ok(None) | Err(_) => break,
            };
            let Link {
                reader,
                mut writer,
                closer,
            } = link;
            let gen = {
                let mut core = self.lock();
                if core.closed {
                    closer();
                    break;
                }
                core.link_gen += 1;
                core.link_alive = true;
                core.closer = Some(closer.clone());
                core.stats.links += 1;
                core.session = match self.role {
                    Role::Host => Session::Handshaking(random_u64()),
                    Role::Guest => Session::Down,
                };
                core.need_hello_due = Instant::now();
                core.link_gen
            };
            let me = self.clone();
            let spawned = thread::Builder::new()
                .name("mux-reader".into())
                .spawn(move || me.reader_loop(gen, reader));
            match spawned {
                Ok(handle) => {
                    // A write error just ends this link; the next one starts
                    // a new session, which is the only recovery there is.
                    let _ = self.writer_loop(gen, &mut *writer);
                    let mut core = self.lock();
                    self.link_down(&mut core, gen);
                    drop(core);
                    closer();
                    let _ = handle.join();
                }
                Err(_) => {
                    let mut core = self.lock();
                    self.link_down(&mut core, gen);
                    drop(core);
                    closer();
                    // Out of threads: back off instead of spinning.
                    self.stop.sleep(Duration::from_secs(1));
                }
            }
        }
        self.shutdown();
    }

    fn reader_loop(&self, gen: u64, mut r: Box<dyn Read + Send>) {
        let mut dec = FrameDecoder::new();
        let mut events: Vec<Result<Frame, (u64, u64)>> = Vec::new();
        loop {
            match dec.read_from(&mut *r) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            loop {
                let f = dec.next_frame();
                let (all, nonzero) = dec.take_skipped();
                if all > 0 {
                    events.push(Err((all, nonzero)));
                }
                match f {
                    Some(f) => events.push(Ok(f)),
                    None => break,
                }
            }
            if events.is_empty() {
                continue;
            }
            let mut core = self.lock();
            if core.closed || core.link_gen != gen || !core.link_alive {
                return;
            }
            for ev in events.drain(..) {
                match ev {
                    Ok(f) => self.on_frame(&mut core, f),
                    Err((all, nonzero)) => self.on_garbage(&mut core, all, nonzero),
                }
            }
        }
        let mut core = self.lock();
        self.link_down(&mut core, gen);
    }

    fn writer_loop(&self, gen: u64, w: &mut dyn Write) -> io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(BATCH_BYTES + SYNC_PADDING + MAX_PAYLOAD + 64);
        let mut batch: Vec<Out> = Vec::new();
        let mut next_hello = Instant::now();
        loop {
            buf.clear();
            {
                let mut core = self.lock();
                loop {
                    if core.closed || !core.link_alive || core.link_gen != gen {
                        return Ok(());
                    }
                    if !core.queue.is_empty() {
                        let mut bytes = 0;
                        while let Some(o) = core.queue.pop_front() {
                            bytes += o.payload.len() + 24 + if o.pad { SYNC_PADDING } else { 0 };
                            batch.push(o);
                            if bytes >= BATCH_BYTES {
                                break;
                            }
                        }
                        break;
                    }
                    let now = Instant::now();
                    let deadline = match (self.role, core.session) {
                        (Role::Host, Session::Handshaking(nonce)) => {
                            if now >= next_hello {
                                let mut p = nonce.to_le_bytes().to_vec();
                                p.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                                batch.push(Out {
                                    kind: FrameType::Hello,
                                    stream: 0,
                                    payload: p,
                                    pad: true,
                                });
                                next_hello = now + self.cfg.hello_interval;
                                break;
                            }
                            Some(next_hello)
                        }
                        (Role::Guest, Session::Down) => {
                            if now >= core.need_hello_due {
                                batch.push(Out {
                                    kind: FrameType::NeedHello,
                                    stream: 0,
                                    payload: Vec::new(),
                                    pad: true,
                                });
                                core.need_hello_due = now + self.cfg.need_hello_interval;
                                break;
                            }
                            Some(core.need_hello_due)
                        }
                        _ => None,
                    };
                    core = wait(&self.writer_cv, core, deadline).0;
                }
            }
            for o in batch.drain(..) {
                if o.pad {
                    buf.resize(buf.len() + SYNC_PADDING, 0);
                }
                encode_into(&mut buf, o.kind as u8, o.stream, &o.payload);
            }
            w.write_all(&buf)?;
            w.flush()?;
        }
    }

    fn valid_slot<'a>(&self, core: &'a mut Core, id: u32, epoch: u64) -> io::Result<&'a mut Slot> {
        let closed = core.closed;
        if core.epoch != epoch {
            return Err(gone(closed));
        }
        core.streams.get_mut(&id).ok_or_else(|| gone(closed))
    }
}

/// Drops the session when the last [`MuxEndpoint`] clone goes away.
struct Owner(Arc<Inner>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// One side of a mux session: listen for and open streams, like an AF_VSOCK
/// socket factory.
///
/// Cloning is cheap and shares the session. Dropping the last clone shuts
/// the endpoint down: its streams fail with `ConnectionAborted`.
#[derive(Clone)]
pub struct MuxEndpoint {
    inner: Arc<Inner>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for MuxEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxEndpoint")
            .field("role", &self.inner.role)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl MuxEndpoint {
    /// The guest side over a virtio-serial port device (see
    /// [`find_virtio_port`](crate::find_virtio_port)), with default settings.
    /// Sessions run in background threads and survive the host going away
    /// and coming back.
    pub fn guest(device: impl AsRef<Path>) -> Result<Self, MuxError> {
        let source = VirtioPortSource::open(device.as_ref())?;
        Self::guest_with(source, EndpointConfig::default())
    }

    /// The guest side over any link source.
    pub fn guest_with(source: impl LinkSource, config: EndpointConfig) -> Result<Self, MuxError> {
        Self::start(Role::Guest, Box::new(source), config, false)
    }

    /// The host side over any link source. Guest-initiated streams reach
    /// this endpoint's listeners; opens to other ports are refused.
    pub fn host_with(source: impl LinkSource, config: EndpointConfig) -> Result<Self, MuxError> {
        Self::start(Role::Host, Box::new(source), config, false)
    }

    /// Host side for the bridge: opens to ports without a listener are
    /// queued for [`next_incoming`](Self::next_incoming) instead of refused.
    pub(crate) fn host_accepting_any(
        source: impl LinkSource,
        config: EndpointConfig,
    ) -> Result<Self, MuxError> {
        Self::start(Role::Host, Box::new(source), config, true)
    }

    fn start(
        role: Role,
        source: Box<dyn LinkSource>,
        mut cfg: EndpointConfig,
        accept_any: bool,
    ) -> Result<Self, MuxError> {
        // A zero window would deadlock every stream; more than 1 GiB is
        // certainly a mistake and would defeat the memory bound.
        cfg.window = cfg.window.clamp(1, 1 << 30);
        cfg.backlog = cfg.backlog.max(1);
        cfg.max_streams = cfg.max_streams.max(1);
        let inner = Arc::new(Inner {
            role,
            cfg,
            core: Mutex::new(Core {
                epoch: 0,
                session: Session::Down,
                closed: false,
                link_gen: 0,
                link_alive: false,
                closer: None,
                streams: HashMap::new(),
                listeners: HashMap::new(),
                accept_any,
                incoming: VecDeque::new(),
                queue: VecDeque::new(),
                next_id: match role {
                    Role::Host => 2,
                    Role::Guest => 1,
                },
                next_ping: 1,
                pings: HashMap::new(),
                need_hello_due: Instant::now(),
                stats: EndpointStats::default(),
            }),
            writer_cv: Condvar::new(),
            session_cv: Condvar::new(),
            stop: StopSignal::new(),
        });
        let me = inner.clone();
        thread::Builder::new()
            .name("mux-session".into())
            .spawn(move || me.supervise(source))
            .map_err(|e| MuxError::io("starting the mux session thread", e))?;
        Ok(Self {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        })
    }

    /// Which side this endpoint plays.
    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// Whether a session with the peer is established right now.
    pub fn is_connected(&self) -> bool {
        matches!(self.inner.lock().session, Session::Up(_))
    }

    /// Whether the endpoint has shut down (explicitly, or because its link
    /// source gave up).
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// Waits until a session is established; `false` on timeout or shutdown.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut core = self.inner.lock();
        loop {
            if matches!(core.session, Session::Up(_)) {
                return true;
            }
            if core.closed {
                return false;
            }
            let (g, timed_out) = wait(&self.inner.session_cv, core, Some(deadline));
            core = g;
            if timed_out {
                return matches!(core.session, Session::Up(_));
            }
        }
    }

    /// Counters since the endpoint started.
    pub fn stats(&self) -> EndpointStats {
        self.inner.lock().stats.clone()
    }

    /// Stops the session threads and fails every stream and listener. Also
    /// happens when the last clone is dropped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Listens for streams the peer opens to `port`. The listener outlives
    /// sessions: after a resync, new streams arrive on the same listener.
    pub fn listen(&self, port: u32) -> Result<MuxListener, MuxError> {
        let mut core = self.inner.lock();
        if core.closed {
            return Err(MuxError::Closed);
        }
        if core.listeners.contains_key(&port) {
            return Err(MuxError::PortInUse { port });
        }
        let cv = Arc::new(Condvar::new());
        core.listeners.insert(
            port,
            ListenerSlot {
                backlog: VecDeque::new(),
                cv: cv.clone(),
            },
        );
        Ok(MuxListener {
            inner: self.inner.clone(),
            port,
            cv,
        })
    }

    /// Opens a stream to the peer's `port` (guest → host: the host's
    /// `<uds>_<port>` listener; host → guest: a guest listener). Waits up to
    /// [`EndpointConfig::connect_timeout`] for a session and the answer.
    pub fn connect(&self, port: u32) -> Result<MuxStream, MuxError> {
        let inner = &self.inner;
        let timeout = inner.cfg.connect_timeout;
        let deadline = Instant::now() + timeout;
        let mut core = inner.lock();
        loop {
            if core.closed {
                return Err(MuxError::Closed);
            }
            if matches!(core.session, Session::Up(_)) {
                break;
            }
            let (g, timed_out) = wait(&inner.session_cv, core, Some(deadline));
            core = g;
            if timed_out && !matches!(core.session, Session::Up(_)) {
                return Err(MuxError::NotConnected);
            }
        }
        let id = inner.alloc_id(&mut core);
        let epoch = core.epoch;
        let slot = Slot::new(Phase::Opening, 0);
        let cv = slot.cv.clone();
        core.streams.insert(id, slot);
        let mut p = port.to_le_bytes().to_vec();
        p.extend_from_slice(&inner.cfg.window.to_le_bytes());
        inner.push(&mut core, FrameType::Open, id, p);
        loop {
            let closed = core.closed;
            if core.epoch != epoch {
                return Err(if closed {
                    MuxError::Closed
                } else {
                    MuxError::Reset
                });
            }
            let Some(slot) = core.streams.get(&id) else {
                return Err(MuxError::Reset);
            };
            match slot.phase {
                Phase::Open => {
                    return Ok(MuxStream {
                        inner: inner.clone(),
                        id,
                        epoch,
                        port,
                        cv,
                    })
                }
                Phase::Refused => {
                    core.streams.remove(&id);
                    return Err(MuxError::Refused { port });
                }
                Phase::Opening | Phase::Pending => {}
            }
            let (g, timed_out) = wait(&cv, core, Some(deadline));
            core = g;
            if timed_out
                && core.epoch == epoch
                && core.streams.get(&id).map(|s| s.phase) == Some(Phase::Opening)
            {
                inner.close_slot(&mut core, id);
                return Err(MuxError::ConnectTimeout {
                    port,
                    after: timeout,
                });
            }
        }
    }

    /// Round trip time of a PING through the session.
    pub fn ping(&self, timeout: Duration) -> Result<Duration, MuxError> {
        let inner = &self.inner;
        let start = Instant::now();
        let deadline = start + timeout;
        let mut core = inner.lock();
        if core.closed {
            return Err(MuxError::Closed);
        }
        if !matches!(core.session, Session::Up(_)) {
            return Err(MuxError::NotConnected);
        }
        let token = core.next_ping;
        core.next_ping += 1;
        core.pings.insert(token, false);
        inner.push(&mut core, FrameType::Ping, 0, token.to_le_bytes().to_vec());
        loop {
            match core.pings.get(&token) {
                Some(true) => {
                    core.pings.remove(&token);
                    return Ok(start.elapsed());
                }
                Some(false) => {}
                None => {
                    return Err(if core.closed {
                        MuxError::Closed
                    } else {
                        MuxError::Reset
                    })
                }
            }
            let (g, timed_out) = wait(&inner.session_cv, core, Some(deadline));
            core = g;
            if timed_out && core.pings.get(&token) == Some(&false) {
                core.pings.remove(&token);
                return Err(MuxError::PingTimeout(timeout));
            }
        }
    }

    /// Bridge: the next stream the peer opened to a port without a listener.
    pub(crate) fn next_incoming(&self, timeout: Duration) -> Option<Incoming> {
        let deadline = Instant::now() + timeout;
        let mut core = self.inner.lock();
        loop {
            if let Some((id, port)) = core.incoming.pop_front() {
                return Some(Incoming {
                    inner: self.inner.clone(),
                    id,
                    epoch: core.epoch,
                    port,
                    done: false,
                });
            }
            if core.closed {
                return None;
            }
            let (g, timed_out) = wait(&self.inner.session_cv, core, Some(deadline));
            core = g;
            if timed_out && core.incoming.is_empty() {
                return None;
            }
        }
    }
}

/// A stream the peer wants to open, not yet answered (bridge only).
pub(crate) struct Incoming {
    inner: Arc<Inner>,
    id: u32,
    epoch: u64,
    port: u32,
    done: bool,
}

impl Incoming {
    pub(crate) fn port(&self) -> u32 {
        self.port
    }

    /// Answers OPEN_OK and returns the stream.
    pub(crate) fn accept(mut self) -> Result<MuxStream, MuxError> {
        let inner = self.inner.clone();
        let mut core = inner.lock();
        let slot = inner
            .valid_slot(&mut core, self.id, self.epoch)
            .map_err(|_| MuxError::Reset)?;
        if slot.rst_rx || slot.phase != Phase::Pending {
            // The peer gave up waiting; Drop removes the slot.
            return Err(MuxError::Reset);
        }
        slot.phase = Phase::Open;
        let cv = slot.cv.clone();
        let w = inner.cfg.window;
        inner.push(
            &mut core,
            FrameType::OpenOk,
            self.id,
            w.to_le_bytes().to_vec(),
        );
        self.done = true;
        Ok(MuxStream {
            inner: inner.clone(),
            id: self.id,
            epoch: self.epoch,
            port: self.port,
            cv,
        })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.done {
            // Refuses (OPEN_REFUSED) through close_slot's Pending branch.
            self.inner.release(self.id, self.epoch);
        }
    }
}

/// Accepts streams the peer opens to one port. Dropping it stops listening
/// and resets streams that were not accepted yet.
pub struct MuxListener {
    inner: Arc<Inner>,
    port: u32,
    cv: Arc<Condvar>,
}

impl std::fmt::Debug for MuxListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxListener")
            .field("port", &self.port)
            .finish()
    }
}

impl MuxListener {
    /// The port listened on.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits for the next stream.
    pub fn accept(&self) -> Result<MuxStream, MuxError> {
        self.accept_until(None)?.ok_or(MuxError::Closed)
    }

    /// Waits up to `timeout` for the next stream; `Ok(None)` on timeout.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<MuxStream>, MuxError> {
        self.accept_until(Some(Instant::now() + timeout))
    }

    fn accept_until(&self, deadline: Option<Instant>) -> Result<Option<MuxStream>, MuxError> {
        let mut core = self.inner.lock();
        loop {
            if core.closed {
                return Err(MuxError::Closed);
            }
            let epoch = core.epoch;
            let next = core
                .listeners
                .get_mut(&self.port)
                .and_then(|l| l.backlog.pop_front());
            if let Some(id) = next {
                if let Some(slot) = core.streams.get(&id) {
                    return Ok(Some(MuxStream {
                        inner: self.inner.clone(),
                        id,
                        epoch,
                        port: self.port,
                        cv: slot.cv.clone(),
                    }));
                }
                continue;
            }
            let (g, timed_out) = wait(&self.cv, core, deadline);
            core = g;
            if timed_out {
                return Ok(None);
            }
        }
    }
}

impl Drop for MuxListener {
    fn drop(&mut self) {
        let mut core = self.inner.lock();
        if let Some(l) = core.listeners.remove(&self.port) {
            for id in l.backlog {
                self.inner.close_slot(&mut core, id);
            }
        }
    }
}

/// A bidirectional byte stream through the mux, used like a vsock stream.
///
/// Reads return buffered data first, then `Ok(0)` once the peer shut down
/// its write side, or `ConnectionReset` if the peer or the session went away
/// without that. Writes block while the peer's window is full. `try_clone`
/// gives another handle to the same stream (one thread reading, one writing);
/// the stream closes when the last handle is dropped.
pub struct MuxStream {
    inner: Arc<Inner>,
    id: u32,
    epoch: u64,
    port: u32,
    cv: Arc<Condvar>,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream")
            .field("id", &self.id)
            .field("port", &self.port)
            .finish()
    }
}

impl MuxStream {
    /// Stream id within the session (even: opened by the host; odd: by the guest).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The port this stream was opened to (ours if accepted, the peer's if connected).
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Another handle to the same stream.
    pub fn try_clone(&self) -> io::Result<MuxStream> {
        let mut core = self.inner.lock();
        let slot = self.inner.valid_slot(&mut core, self.id, self.epoch)?;
        slot.handles += 1;
        Ok(MuxStream {
            inner: self.inner.clone(),
            id: self.id,
            epoch: self.epoch,
            port: self.port,
            cv: self.cv.clone(),
        })
    }

    /// Half-close: the peer reads EOF after the data already written; reading
    /// from this stream continues.
    pub fn shutdown_write(&self) -> io::Result<()> {
        let mut core = self.inner.lock();
        let slot = self.inner.valid_slot(&mut core, self.id, self.epoch)?;
        if slot.fin_tx || slot.rst_rx {
            slot.fin_tx = true;
            return Ok(());
        }
        slot.fin_tx = true;
        slot.cv.notify_all();
        self.inner
            .push(&mut core, FrameType::Fin, self.id, Vec::new());
        Ok(())
    }

    /// Read timeout shared by all handles; `None` blocks indefinitely. A
    /// timed-out read fails with `WouldBlock`, as on a socket.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
        }
        let mut core = self.inner.lock();
        self.inner
            .valid_slot(&mut core, self.id, self.epoch)?
            .read_timeout = timeout;
        Ok(())
    }

    /// Write timeout shared by all handles; `None` blocks indefinitely.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
        }
        let mut core = self.inner.lock();
        self.inner
            .valid_slot(&mut core, self.id, self.epoch)?
            .write_timeout = timeout;
        Ok(())
    }

    /// Blocks until nothing more can flow towards the peer: the peer closed
    /// the stream (RST), we sent FIN, or the stream is gone. The bridge uses it
    /// to close the host connection once the guest has closed, as Firecracker does.
    pub(crate) fn wait_peer_done(&self) {
        let mut core = self.inner.lock();
        loop {
            match self.inner.valid_slot(&mut core, self.id, self.epoch) {
                Err(_) => return,
                Ok(slot) if slot.rst_rx || slot.fin_tx => return,
                Ok(_) => {}
            }
            core = wait(&self.cv, core, None).0;
        }
    }

    fn read_impl(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let inner = &self.inner;
        let threshold = (inner.cfg.window as usize / 4).max(1);
        let mut core = inner.lock();
        let mut deadline: Option<Option<Instant>> = None;
        loop {
            let slot = inner.valid_slot(&mut core, self.id, self.epoch)?;
            if slot.recv_len > 0 {
                let mut n = 0;
                while n < buf.len() {
                    let Some(front) = slot.recv.front() else {
                        break;
                    };
                    let avail = &front[slot.recv_off..];
                    let k = avail.len().min(buf.len() - n);
                    buf[n..n + k].copy_from_slice(&avail[..k]);
                    n += k;
                    slot.recv_off += k;
                    if slot.recv_off == front.len() {
                        slot.recv.pop_front();
                        slot.recv_off = 0;
                    }
                }
                slot.recv_len -= n;
                slot.unacked += n;
                if slot.unacked >= threshold && !slot.fin_rx && !slot.rst_rx {
                    let inc = slot.unacked as u32;
                    slot.unacked = 0;
                    inner.push(
                        &mut core,
                        FrameType::Window,
                        self.id,
                        inc.to_le_bytes().to_vec(),
                    );
                }
                return Ok(n);
            }
            if slot.fin_rx {
                return Ok(0);
            }
            if slot.rst_rx {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the peer reset the stream",
                ));
            }
            let d = *deadline.get_or_insert_with(|| slot.read_timeout.map(|t| Instant::now() + t));
            let (g, timed_out) = wait(&self.cv, core, d);
            core = g;
            if timed_out {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "read timed out"));
            }
        }
    }

    fn write_impl(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let inner = &self.inner;
        let mut core = inner.lock();
        let mut deadline: Option<Option<Instant>> = None;
        loop {
            let slot = inner.valid_slot(&mut core, self.id, self.epoch)?;
            if slot.fin_tx {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the write side was shut down",
                ));
            }
            if slot.rst_rx {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the peer closed the stream",
                ));
            }
            if slot.send_credit > 0 {
                let n = buf
                    .len()
                    .min(MAX_PAYLOAD)
                    .min(slot.send_credit.min(usize::MAX as u64) as usize);
                slot.send_credit -= n as u64;
                inner.push(&mut core, FrameType::Data, self.id, buf[..n].to_vec());
                return Ok(n);
            }
            let d = *deadline.get_or_insert_with(|| slot.write_timeout.map(|t| Instant::now() + t));
            let (g, timed_out) = wait(&self.cv, core, d);
            core = g;
            if timed_out {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "write timed out"));
            }
        }
    }
}

impl Read for MuxStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_impl(buf)
    }
}

impl Read for &MuxStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_impl(buf)
    }
}

impl Write for MuxStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_impl(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &MuxStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_impl(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        self.inner.release(self.id, self.epoch);
    }
}
