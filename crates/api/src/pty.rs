//! Terminal stream framing.
//!
//! A terminal needs more than bytes: the viewer's window changes size and
//! the shell's exit status should reach it. After the guest agent answers
//! a [`crate::agent::ForwardTarget::Pty`] with `forward_ready`, both
//! directions carry frames: a tag byte, a big-endian `u32` payload length,
//! the payload. Host → guest: [`PtyFrame::Data`] (keyboard input) and
//! [`PtyFrame::Resize`] and [`PtyFrame::Close`]; guest → host:
//! [`PtyFrame::Data`] (terminal output) and finally [`PtyFrame::Exit`].

use crate::agent::ExitStatus;

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

const TAG_DATA: u8 = 1;
const TAG_RESIZE: u8 = 2;
const TAG_EXIT: u8 = 3;
const TAG_CLOSE: u8 = 4;
const HEADER: usize = 5;

/// One frame of a terminal stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyFrame {
    /// Bytes typed into (host → guest) or printed by (guest → host) the
    /// terminal.
    Data(Vec<u8>),
    /// The viewer's window size changed.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// The shell ended; the last frame the guest sends.
    Exit(ExitStatus),
    /// End the terminal (hang up its shell), rather than only leave it as
    /// closing the stream of a kept terminal does.
    Close,
}

/// A stream that does not follow the framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PtyFrameError {
    /// Unknown tag byte.
    #[error("unknown terminal frame tag {0}; both ends must speak the same protocol version")]
    Tag(u8),
    /// Payload longer than [`MAX_PAYLOAD`].
    #[error("terminal frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(usize),
    /// A payload of the wrong shape for its tag.
    #[error("malformed terminal {0} frame")]
    Malformed(&'static str),
}

impl PtyFrame {
    /// The frame on the wire. Data longer than [`MAX_PAYLOAD`] must be
    /// split by the caller (see [`PtyFrame::data_frames`]).
    pub fn encode(&self) -> Vec<u8> {
        let (tag, payload) = match self {
            PtyFrame::Data(d) => (TAG_DATA, d.clone()),
            PtyFrame::Resize { cols, rows } => {
                let mut p = cols.to_be_bytes().to_vec();
                p.extend_from_slice(&rows.to_be_bytes());
                (TAG_RESIZE, p)
            }
            PtyFrame::Exit(st) => (TAG_EXIT, serde_json::to_vec(st).unwrap_or_default()),
            PtyFrame::Close => (TAG_CLOSE, Vec::new()),
        };
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.push(tag);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// `data` as encoded [`PtyFrame::Data`] frames of at most
    /// [`MAX_PAYLOAD`] bytes each.
    pub fn data_frames(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + HEADER);
        for chunk in data.chunks(MAX_PAYLOAD) {
            out.push(TAG_DATA);
            out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }
}

/// Splits a byte stream into frames, whatever the read boundaries were.
#[derive(Debug, Default)]
pub struct PtyDecoder {
    buf: Vec<u8>,
}

impl PtyDecoder {
    /// Add bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` until one is buffered. After an
    /// error the stream cannot be resynchronised: close it.
    pub fn next_frame(&mut self) -> Result<Option<PtyFrame>, PtyFrameError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if !matches!(tag, TAG_DATA | TAG_RESIZE | TAG_EXIT | TAG_CLOSE) {
            return Err(PtyFrameError::Tag(tag));
        }
        if len > MAX_PAYLOAD {
            return Err(PtyFrameError::TooLong(len));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let payload: Vec<u8> = self.buf.drain(..HEADER + len).skip(HEADER).collect();
        let frame = match tag {
            TAG_DATA => PtyFrame::Data(payload),
            TAG_RESIZE => match payload[..] {
                [c0, c1, r0, r1] => PtyFrame::Resize {
                    cols: u16::from_be_bytes([c0, c1]),
                    rows: u16::from_be_bytes([r0, r1]),
                },
                _ => return Err(PtyFrameError::Malformed("resize")),
            },
            TAG_CLOSE if payload.is_empty() => PtyFrame::Close,
            TAG_CLOSE => return Err(PtyFrameError::Malformed("close")),
            _ => PtyFrame::Exit(
                serde_json::from_slice(&payload).map_err(|_| PtyFrameError::Malformed("exit"))?,
            ),
        };
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<PtyFrame> {
        vec![
            PtyFrame::Data(b"ls -l\r".to_vec()),
            PtyFrame::Data(Vec::new()),
            PtyFrame::Resize {
                cols: 132,
                rows: 43,
            },
            PtyFrame::Exit(ExitStatus {
                code: Some(3),
                signal: None,
                timed_out: false,
            }),
            PtyFrame::Close,
        ]
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let frames = all_frames();
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode()).collect();
        for step in [1, 2, 3, 5, 7, wire.len()] {
            let mut d = PtyDecoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split every {step} bytes");
        }
    }

    #[test]
    fn long_data_is_split_into_frames_under_the_limit() {
        let data: Vec<u8> = (0..MAX_PAYLOAD * 2 + 10).map(|i| i as u8).collect();
        let mut d = PtyDecoder::default();
        d.push(&PtyFrame::data_frames(&data));
        let mut back = Vec::new();
        let mut n = 0;
        while let Some(PtyFrame::Data(b)) = d.next_frame().unwrap() {
            assert!(b.len() <= MAX_PAYLOAD);
            back.extend(b);
            n += 1;
        }
        assert_eq!((n, back), (3, data));
    }

    #[test]
    fn bad_streams_are_errors_not_panics() {
        let cases: [(&[u8], PtyFrameError); 4] = [
            (&[9, 0, 0, 0, 0], PtyFrameError::Tag(9)),
            (&[1, 0, 1, 0, 1], PtyFrameError::TooLong(65537)),
            (
                &[2, 0, 0, 0, 3, 0, 80, 0],
                PtyFrameError::Malformed("resize"),
            ),
            (
                &[3, 0, 0, 0, 2, b'{', b'x'],
                PtyFrameError::Malformed("exit"),
            ),
        ];
        for (wire, want) in cases {
            let mut d = PtyDecoder::default();
            d.push(wire);
            assert_eq!(d.next_frame(), Err(want), "{wire:?}");
        }
    }
}
