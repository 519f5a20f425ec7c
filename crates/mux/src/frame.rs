//! The wire format: fixed-size frame headers, payloads, and a decoder that
//! finds frame boundaries again after garbage.
//!
//! Header (24 bytes, little endian):
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 4    | magic `PdMx`                            |
//! | 4      | 1    | protocol version (1)                    |
//! | 5      | 1    | frame type ([`FrameType`])              |
//! | 6      | 2    | flags, must be 0                        |
//! | 8      | 4    | stream id (0 for session frames)        |
//! | 12     | 4    | payload length (≤ [`MAX_PAYLOAD`])      |
//! | 16     | 4    | CRC-32C of the payload                  |
//! | 20     | 4    | CRC-32C of header bytes 0..20           |
//!
//! The header has its own checksum so a decoder that is hunting for a frame
//! boundary can reject a false magic immediately instead of waiting for up to
//! 64 KiB of "payload" that will never be valid.

use std::io::{self, Read};

use crate::crc::crc32c;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"PdMx";
/// Version byte carried by every frame.
pub const VERSION: u8 = 1;
/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 24;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest encoded frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;
/// Zero bytes sent before session-control frames (HELLO, HELLO_ACK,
/// NEED_HELLO). A receiver that is stuck in the middle of a frame from a
/// previous session (for example a guest restored from a snapshot that was
/// taken mid-frame) needs at most this many bytes to complete that frame, fail
/// its checksum and start hunting for the magic again.
pub const SYNC_PADDING: usize = MAX_FRAME;

/// What a frame means. Payload layouts are given per variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Host → guest, stream 0: start a session. Payload: nonce u64, version u32.
    Hello = 1,
    /// Guest → host, stream 0: session accepted. Payload: the HELLO's nonce u64.
    HelloAck = 2,
    /// Guest → host, stream 0: "I have no session, send HELLO". Empty.
    NeedHello = 3,
    /// Open a stream. Payload: destination port u32, opener's receive window u32.
    Open = 4,
    /// The stream is open. Payload: acceptor's receive window u32.
    OpenOk = 5,
    /// Nobody listens on the port. Empty.
    OpenRefused = 6,
    /// Stream bytes (1..=MAX_PAYLOAD of them).
    Data = 7,
    /// The receiver consumed bytes: more credit. Payload: increment u32.
    Window = 8,
    /// The sender will write no more on this stream (half-close). Empty.
    Fin = 9,
    /// The sender is gone from this stream; drop it. Empty.
    Rst = 10,
    /// Liveness probe, stream 0. Payload: token u64.
    Ping = 11,
    /// Answer to PING, stream 0. Payload: the PING's token u64.
    Pong = 12,
}

impl FrameType {
    /// The type for a wire byte, if it is one this version knows.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::NeedHello,
            4 => Self::Open,
            5 => Self::OpenOk,
            6 => Self::OpenRefused,
            7 => Self::Data,
            8 => Self::Window,
            9 => Self::Fin,
            10 => Self::Rst,
            11 => Self::Ping,
            12 => Self::Pong,
            _ => return None,
        })
    }
}

/// One decoded frame. `kind` is the raw type byte so that frames of types a
/// newer peer invented can be skipped rather than treated as garbage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Raw type byte; see [`FrameType::from_u8`].
    pub kind: u8,
    /// Stream id, 0 for session frames.
    pub stream: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame of a known type.
    pub fn new(kind: FrameType, stream: u32, payload: Vec<u8>) -> Self {
        Self {
            kind: kind as u8,
            stream,
            payload,
        }
    }

    /// The frame's type, if known.
    pub fn frame_type(&self) -> Option<FrameType> {
        FrameType::from_u8(self.kind)
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode_into(out, self.kind, self.stream, &self.payload);
    }
}

/// Appends one encoded frame to `out`. Payloads longer than [`MAX_PAYLOAD`]
/// are a caller bug; they are encoded anyway and the peer will reject them.
pub fn encode_into(out: &mut Vec<u8>, kind: u8, stream: u32, payload: &[u8]) {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind;
    h[8..12].copy_from_slice(&stream.to_le_bytes());
    h[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[16..20].copy_from_slice(&crc32c(payload).to_le_bytes());
    let hcrc = crc32c(&h[0..20]);
    h[20..24].copy_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a little-endian u32 at `at` if the slice is long enough.
pub(crate) fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads a little-endian u64 at `at` if the slice is long enough.
pub(crate) fn get_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    Some(u64::from_le_bytes([
        s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
    ]))
}

/// Incremental frame decoder with resynchronisation.
///
/// Bytes that are not part of a valid frame (wrong magic, bad header or
/// payload checksum, impossible length) are skipped one at a time and counted;
/// the caller decides what skipped bytes mean (during a handshake they are
/// expected, inside an established session they mean the session is broken).
/// Memory is bounded: the buffer holds at most a few maximum-size frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    skipped: u64,
    skipped_nonzero: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// Capacity of the internal buffer.
    pub const CAPACITY: usize = 4 * MAX_FRAME;

    /// An empty decoder.
    pub fn new() -> Self {
        Self {
            buf: vec![0u8; Self::CAPACITY].into_boxed_slice(),
            start: 0,
            end: 0,
            skipped: 0,
            skipped_nonzero: 0,
        }
    }

    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Reads once from `r` into the buffer. Returns what `read` returned, so
    /// `Ok(0)` means end of stream. Call [`next_frame`](Self::next_frame)
    /// until it yields `None` before reading again.
    pub fn read_from<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        self.make_room();
        if self.end == self.buf.len() {
            // Cannot happen when next_frame was drained: a full buffer always
            // holds a complete frame or skippable garbage. Refuse rather than
            // report a fake end of stream.
            return Err(io::Error::other("frame decoder buffer full"));
        }
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Copies as much of `bytes` as fits; returns how many were taken.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        self.make_room();
        let n = bytes.len().min(self.buf.len() - self.end);
        self.buf[self.end..self.end + n].copy_from_slice(&bytes[..n]);
        self.end += n;
        n
    }

    /// Garbage skipped since the last call: `(all bytes, non-zero bytes)`.
    /// Zero bytes are told apart because they are what session padding
    /// ([`SYNC_PADDING`]) consists of, and padding is not a sign of damage.
    pub fn take_skipped(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.skipped),
            std::mem::take(&mut self.skipped_nonzero),
        )
    }

    /// Bytes buffered but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn skip(&mut self, n: usize) {
        let nonzero = self.buf[self.start..self.start + n]
            .iter()
            .filter(|&&b| b != 0)
            .count();
        self.start += n;
        self.skipped += n as u64;
        self.skipped_nonzero += nonzero as u64;
    }

    /// The next complete, valid frame in the buffer, if any.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let avail = &self.buf[self.start..self.end];
            if avail.len() < MAGIC.len() {
                // Keep a possible magic prefix; drop anything else.
                let keep = (1..=avail.len())
                    .rev()
                    .find(|&k| avail[avail.len() - k..] == MAGIC[..k])
                    .unwrap_or(0);
                let drop = avail.len() - keep;
                self.skip(drop);
                return None;
            }
            if avail[..4] != MAGIC {
                match find_magic(avail) {
                    Some(p) => {
                        self.skip(p);
                        continue;
                    }
                    None => {
                        // The last 3 bytes may be the start of a magic.
                        let keep = (1..MAGIC.len())
                            .rev()
                            .find(|&k| avail[avail.len() - k..] == MAGIC[..k])
                            .unwrap_or(0);
                        let drop = avail.len() - keep;
                        self.skip(drop);
                        return None;
                    }
                }
            }
            if avail.len() < HEADER_LEN {
                return None;
            }
            let h = &avail[..HEADER_LEN];
            let header_ok = le32(h, 20) == crc32c(&h[0..20])
                && h[4] == VERSION
                && h[6] == 0
                && h[7] == 0
                && (le32(h, 12) as usize) <= MAX_PAYLOAD;
            if !header_ok {
                self.skip(1);
                continue;
            }
            let len = le32(h, 12) as usize;
            if avail.len() < HEADER_LEN + len {
                return None;
            }
            let payload = &avail[HEADER_LEN..HEADER_LEN + len];
            if crc32c(payload) != le32(h, 16) {
                self.skip(1);
                continue;
            }
            let frame = Frame {
                kind: h[5],
                stream: le32(h, 8),
                payload: payload.to_vec(),
            };
            self.start += HEADER_LEN + len;
            return Some(frame);
        }
    }
}

fn find_magic(hay: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(off) = hay[from..].iter().position(|&b| b == MAGIC[0]) {
        let p = from + off;
        if hay.len() - p < MAGIC.len() {
            return None;
        }
        if hay[p..p + MAGIC.len()] == MAGIC {
            return Some(p);
        }
        from = p + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic, dependency-free randomness for tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn decode_all(dec: &mut FrameDecoder, mut input: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let n = dec.feed(input);
            input = &input[n..];
            while let Some(f) = dec.next_frame() {
                out.push(f);
            }
        }
        out
    }

    #[test]
    fn round_trip_all_types_and_sizes() {
        let mut rng = Rng(0x1234_5678);
        let mut frames = Vec::new();
        for (i, len) in [
            0usize,
            1,
            2,
            3,
            23,
            24,
            25,
            4096,
            MAX_PAYLOAD - 1,
            MAX_PAYLOAD,
        ]
        .iter()
        .enumerate()
        {
            for t in 1..=12u8 {
                frames.push(Frame {
                    kind: t,
                    stream: (i as u32) * 1000 + t as u32,
                    payload: rng.bytes(*len),
                });
            }
        }
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire);
        }
        let mut dec = FrameDecoder::new();
        let got = decode_all(&mut dec, &wire);
        assert_eq!(got, frames);
        assert_eq!(dec.take_skipped(), (0, 0));
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn byte_at_a_time() {
        let f = Frame::new(FrameType::Data, 7, b"hello world".to_vec());
        let mut wire = Vec::new();
        f.encode_into(&mut wire);
        f.encode_into(&mut wire);
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &wire {
            assert_eq!(dec.feed(std::slice::from_ref(b)), 1);
            while let Some(f) = dec.next_frame() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![f.clone(), f]);
        assert_eq!(dec.take_skipped(), (0, 0));
    }

    #[test]
    fn resyncs_after_garbage() {
        let mut rng = Rng(99);
        let good = Frame::new(FrameType::Hello, 0, rng.bytes(12));
        let mut wire = rng.bytes(5000);
        // Garbage containing a false magic followed by junk.
        wire.extend_from_slice(&MAGIC);
        wire.extend_from_slice(&rng.bytes(30));
        let garbage_len = wire.len();
        good.encode_into(&mut wire);
        let mut dec = FrameDecoder::new();
        let got = decode_all(&mut dec, &wire);
        assert_eq!(got, vec![good]);
        assert_eq!(dec.take_skipped().0, garbage_len as u64);
    }

    #[test]
    fn resyncs_when_stuck_in_a_truncated_frame() {
        // A frame cut short (as when a snapshot is taken mid-frame), then the
        // padding a new session starts with, then a HELLO.
        let mut rng = Rng(7);
        let mut wire = Vec::new();
        Frame::new(FrameType::Data, 3, rng.bytes(MAX_PAYLOAD)).encode_into(&mut wire);
        wire.truncate(HEADER_LEN + 100);
        wire.extend(std::iter::repeat_n(0u8, SYNC_PADDING));
        let hello = Frame::new(FrameType::Hello, 0, rng.bytes(12));
        hello.encode_into(&mut wire);
        let mut dec = FrameDecoder::new();
        assert_eq!(decode_all(&mut dec, &wire), vec![hello]);
        let (all, nonzero) = dec.take_skipped();
        assert!(all >= SYNC_PADDING as u64 && nonzero > 0 && nonzero < all);
    }

    #[test]
    fn padding_alone_is_zero_garbage() {
        let mut wire = vec![0u8; SYNC_PADDING];
        let ack = Frame::new(FrameType::HelloAck, 0, 5u64.to_le_bytes().to_vec());
        ack.encode_into(&mut wire);
        let mut dec = FrameDecoder::new();
        assert_eq!(decode_all(&mut dec, &wire), vec![ack]);
        assert_eq!(dec.take_skipped(), (SYNC_PADDING as u64, 0));
    }

    #[test]
    fn finds_a_frame_hidden_inside_a_corrupt_frame() {
        // A corrupt outer frame whose payload contains a valid frame: after the
        // outer checksum fails, the decoder must rescan the outer payload.
        let inner = Frame::new(FrameType::Ping, 0, 42u64.to_le_bytes().to_vec());
        let mut inner_wire = Vec::new();
        inner.encode_into(&mut inner_wire);
        let mut payload = vec![1u8; 100];
        payload.extend_from_slice(&inner_wire);
        payload.extend_from_slice(&[2u8; 10]);
        let mut wire = Vec::new();
        Frame::new(FrameType::Data, 1, payload).encode_into(&mut wire);
        let last = wire.len() - 1;
        wire[last] ^= 0xFF; // break the outer payload checksum
        let mut dec = FrameDecoder::new();
        assert_eq!(decode_all(&mut dec, &wire), vec![inner]);
    }

    #[test]
    fn random_bytes_never_panic_and_stay_bounded() {
        let mut rng = Rng(0xDEAD_BEEF);
        let mut dec = FrameDecoder::new();
        let mut total = 0u64;
        for round in 0..200 {
            let len = 1 + (rng.next() % 20_000) as usize;
            let mut chunk = rng.bytes(len);
            // Sprinkle magics and plausible headers to exercise deeper paths.
            if round % 3 == 0 {
                let at = (rng.next() as usize) % chunk.len();
                let end = (at + 4).min(chunk.len());
                chunk[at..end].copy_from_slice(&MAGIC[..end - at]);
            }
            total += chunk.len() as u64;
            let mut input = &chunk[..];
            while !input.is_empty() {
                let n = dec.feed(input);
                input = &input[n..];
                while dec.next_frame().is_some() {}
                assert!(dec.buffered() <= FrameDecoder::CAPACITY);
            }
        }
        // Random data decodes to nothing: every byte is skipped or still
        // buffered as a possible partial frame.
        assert_eq!(dec.take_skipped().0 + dec.buffered() as u64, total);
    }

    #[test]
    fn random_mutations_of_valid_streams_never_panic() {
        let mut rng = Rng(42);
        for _ in 0..300 {
            let mut wire = Vec::new();
            let mut frames = Vec::new();
            for _ in 0..(1 + rng.next() % 6) {
                let len = (rng.next() % 300) as usize;
                let f = Frame {
                    kind: (rng.next() % 14) as u8,
                    stream: rng.next() as u32,
                    payload: rng.bytes(len),
                };
                f.encode_into(&mut wire);
                frames.push(f);
            }
            let flips = rng.next() % 4;
            for _ in 0..flips {
                let at = (rng.next() as usize) % wire.len();
                wire[at] ^= 1 << (rng.next() % 8);
            }
            let mut dec = FrameDecoder::new();
            let got = decode_all(&mut dec, &wire);
            // Every decoded frame is one that was sent: checksums reject damage.
            for f in &got {
                assert!(frames.contains(f), "decoded a frame that was never sent");
            }
            if flips == 0 {
                assert_eq!(got, frames);
            }
        }
    }

    #[test]
    fn rejects_oversized_length() {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = FrameType::Data as u8;
        h[12..16].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
        let c = crc32c(&h[0..20]);
        h[20..24].copy_from_slice(&c.to_le_bytes());
        let mut dec = FrameDecoder::new();
        dec.feed(&h);
        assert!(dec.next_frame().is_none());
        // Header rejected at once: only a short tail that could be a magic
        // prefix may remain.
        assert!(dec.buffered() < MAGIC.len());
    }
}
