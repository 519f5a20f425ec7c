//! A minimal RFB (VNC) client, RFC 6143: full-screen screenshots of a
//! desktop from outside its VM, and a person's keys and clicks into it —
//! over TCP, or over the controller's desktop WebSocket ([`WsStream`]).
//!
//! Protocol 3.8, security type None (the VNC server has no password: it is
//! reachable only through the guest agent's forward, which the host
//! authorizes), 32-bit true colour, Raw encoding only.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// One captured frame: `width * height` pixels, RGB.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The desktop's name as the server announced it.
    pub name: String,
    /// Row-major RGB triples.
    pub pixels: Vec<[u8; 3]>,
}

impl Frame {
    /// The pixel at (`x`, `y`).
    pub fn at(&self, x: usize, y: usize) -> [u8; 3] {
        self.pixels[y * self.width + x]
    }

    /// Distinct colours inside the rectangle (clipped to the frame).
    pub fn colours_in(&self, x: usize, y: usize, w: usize, h: usize) -> usize {
        let mut seen = std::collections::HashSet::new();
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                seen.insert(self.at(xx, yy));
            }
        }
        seen.len()
    }

    /// Share of the rectangle's pixels equal to `colour`.
    pub fn share_of(&self, colour: [u8; 3], x: usize, y: usize, w: usize, h: usize) -> f64 {
        let (mut same, mut all) = (0usize, 0usize);
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                all += 1;
                if self.at(xx, yy) == colour {
                    same += 1;
                }
            }
        }
        if all == 0 {
            return 1.0;
        }
        same as f64 / all as f64
    }

    /// Write the frame as a PNG.
    pub fn save_png(&self, path: &Path) -> io::Result<()> {
        let file = std::fs::File::create(path)?;
        let mut enc = png::Encoder::new(
            io::BufWriter::new(file),
            self.width as u32,
            self.height as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(io::Error::other)?;
        let data: Vec<u8> = self.pixels.iter().flatten().copied().collect();
        w.write_image_data(&data).map_err(io::Error::other)?;
        w.finish().map_err(io::Error::other)
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Connect to the RFB server at `addr` and capture one full frame.
pub fn capture(addr: &str, timeout: Duration) -> io::Result<Frame> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Session::handshake(s)?.frame()
}

/// X keysyms the tests type with (X11 `keysymdef.h`).
pub mod keysym {
    /// Return (Enter).
    pub const RETURN: u32 = 0xff0d;
    /// Tab.
    pub const TAB: u32 = 0xff09;
    /// BackSpace.
    pub const BACKSPACE: u32 = 0xff08;
    /// Left Control.
    pub const CONTROL_L: u32 = 0xffe3;
}

/// A live RFB session over any byte stream (a TCP connection, or the
/// controller's desktop WebSocket through [`crate::rfb::WsStream`]): frames
/// out, keys and pointer in — what a person at the desktop sees and does.
pub struct Session<S: Read + Write> {
    s: S,
    /// Framebuffer width.
    pub width: usize,
    /// Framebuffer height.
    pub height: usize,
    /// The desktop's name.
    pub name: String,
    pixels: Vec<[u8; 3]>,
}

impl<S: Read + Write> Session<S> {
    /// Protocol 3.8, security None, shared session; 32-bit true colour and
    /// Raw encoding requested.
    pub fn handshake(mut s: S) -> io::Result<Self> {
        let version = read_vec(&mut s, 12)?;
        if !version.starts_with(b"RFB 003.") {
            return Err(proto(format!(
                "not an RFB server: {:?}",
                String::from_utf8_lossy(&version)
            )));
        }
        s.write_all(b"RFB 003.008\n")?;
        // Security: must offer None (1).
        let n = read_u8(&mut s)?;
        if n == 0 {
            let len = read_u32(&mut s)? as usize;
            let why = read_vec(&mut s, len.min(4096))?;
            return Err(proto(format!(
                "server refused: {}",
                String::from_utf8_lossy(&why)
            )));
        }
        let types = read_vec(&mut s, n as usize)?;
        if !types.contains(&1) {
            return Err(proto(format!(
                "server wants authentication (security types {types:?})"
            )));
        }
        s.write_all(&[1])?;
        s.flush()?;
        if read_u32(&mut s)? != 0 {
            return Err(proto("security handshake failed"));
        }
        // Init: shared session.
        s.write_all(&[1])?;
        s.flush()?;
        let init = read_vec(&mut s, 24)?;
        let width = u16_at(&init, 0) as usize;
        let height = u16_at(&init, 2) as usize;
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
        let name = String::from_utf8_lossy(&read_vec(&mut s, name_len.min(4096))?).into_owned();
        if width == 0 || height == 0 {
            return Err(proto("empty framebuffer"));
        }
        // 32 bpp, depth 24, little endian, true colour, 8 bits per channel
        // (red at bit 16, green 8, blue 0).
        let mut msg = vec![0u8, 0, 0, 0];
        msg.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
        s.write_all(&msg)?;
        // Raw encoding only.
        s.write_all(&[2, 0, 0, 1, 0, 0, 0, 0])?;
        s.flush()?;
        Ok(Session {
            s,
            width,
            height,
            name,
            pixels: vec![[0u8; 3]; width * height],
        })
    }

    /// The whole screen as it is now (a full, non-incremental update).
    pub fn frame(&mut self) -> io::Result<Frame> {
        let (width, height) = (self.width, self.height);
        let mut req = vec![3u8, 0, 0, 0, 0, 0];
        req.extend_from_slice(&(width as u16).to_be_bytes());
        req.extend_from_slice(&(height as u16).to_be_bytes());
        self.s.write_all(&req)?;
        self.s.flush()?;
        let mut covered = vec![false; width * height];
        let mut left = width * height;
        while left > 0 {
            match read_u8(&mut self.s)? {
                0 => {
                    read_u8(&mut self.s)?;
                    let rects = read_u16(&mut self.s)?;
                    for _ in 0..rects {
                        let hdr = read_vec(&mut self.s, 12)?;
                        let (x, y) = (u16_at(&hdr, 0) as usize, u16_at(&hdr, 2) as usize);
                        let (w, h) = (u16_at(&hdr, 4) as usize, u16_at(&hdr, 6) as usize);
                        let enc = i32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
                        if enc != 0 {
                            return Err(proto(format!("unrequested encoding {enc}")));
                        }
                        if x + w > width || y + h > height {
                            return Err(proto("rectangle outside the framebuffer"));
                        }
                        let data = read_vec(&mut self.s, w * h * 4)?;
                        for row in 0..h {
                            for col in 0..w {
                                let p = &data[(row * w + col) * 4..][..4];
                                let i = (y + row) * width + x + col;
                                // Little-endian 0x00RRGGBB: bytes B, G, R, 0.
                                self.pixels[i] = [p[2], p[1], p[0]];
                                if !covered[i] {
                                    covered[i] = true;
                                    left -= 1;
                                }
                            }
                        }
                    }
                    if left > 0 {
                        // Ask for the rest.
                        self.s.write_all(&req)?;
                        self.s.flush()?;
                    }
                }
                1 => {
                    read_u8(&mut self.s)?;
                    read_u16(&mut self.s)?;
                    let n = read_u16(&mut self.s)? as usize;
                    read_vec(&mut self.s, n * 6)?;
                }
                2 => {}
                3 => {
                    read_vec(&mut self.s, 3)?;
                    let len = read_u32(&mut self.s)? as usize;
                    if len > 16 << 20 {
                        return Err(proto("cut text too long"));
                    }
                    read_vec(&mut self.s, len)?;
                }
                t => return Err(proto(format!("unknown server message type {t}"))),
            }
        }
        Ok(Frame {
            width,
            height,
            name: self.name.clone(),
            pixels: self.pixels.clone(),
        })
    }

    /// Press (`down`) or release a key.
    pub fn key(&mut self, keysym: u32, down: bool) -> io::Result<()> {
        let mut m = vec![4u8, u8::from(down), 0, 0];
        m.extend_from_slice(&keysym.to_be_bytes());
        self.s.write_all(&m)?;
        self.s.flush()
    }

    /// Press and release a key.
    pub fn tap(&mut self, keysym: u32) -> io::Result<()> {
        self.key(keysym, true)?;
        self.key(keysym, false)
    }

    /// Type ASCII text key by key (printable characters are their own
    /// keysyms; `\n` is Return).
    pub fn type_text(&mut self, text: &str) -> io::Result<()> {
        for c in text.chars() {
            let k = match c {
                '\n' => keysym::RETURN,
                c if (' '..='~').contains(&c) => c as u32,
                c => return Err(proto(format!("cannot type {c:?} as a keysym here"))),
            };
            self.tap(k)?;
        }
        Ok(())
    }

    /// Control + `key` (e.g. `'a'` to select all).
    pub fn ctrl(&mut self, key: char) -> io::Result<()> {
        self.key(keysym::CONTROL_L, true)?;
        self.tap(key as u32)?;
        self.key(keysym::CONTROL_L, false)
    }

    /// Move the pointer to (`x`, `y`) with `buttons` held (bit 0: left).
    pub fn pointer(&mut self, x: usize, y: usize, buttons: u8) -> io::Result<()> {
        let mut m = vec![5u8, buttons];
        m.extend_from_slice(&(x.min(u16::MAX as usize) as u16).to_be_bytes());
        m.extend_from_slice(&(y.min(u16::MAX as usize) as u16).to_be_bytes());
        self.s.write_all(&m)?;
        self.s.flush()
    }

    /// A left click at (`x`, `y`): move, press, release.
    pub fn click(&mut self, x: usize, y: usize) -> io::Result<()> {
        self.pointer(x, y, 0)?;
        self.pointer(x, y, 1)?;
        self.pointer(x, y, 0)
    }
}

fn read_u8(s: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_vec(s: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

impl Frame {
    /// The bounding box (x, y, w, h) of the pixels within `tolerance` (per
    /// channel) of `colour`, if at least `min_pixels` of them exist: how a
    /// test finds a page's field or button by its fill colour.
    pub fn find_colour(
        &self,
        colour: [u8; 3],
        tolerance: u8,
        min_pixels: usize,
    ) -> Option<(usize, usize, usize, usize)> {
        let near = |p: [u8; 3]| {
            p.iter()
                .zip(colour.iter())
                .all(|(a, b)| a.abs_diff(*b) <= tolerance)
        };
        let (mut x0, mut y0, mut x1, mut y1, mut n) = (usize::MAX, usize::MAX, 0, 0, 0usize);
        for y in 0..self.height {
            for x in 0..self.width {
                if near(self.at(x, y)) {
                    n += 1;
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
            }
        }
        (n >= min_pixels).then(|| (x0, y0, x1 - x0 + 1, y1 - y0 + 1))
    }
}

/// A WebSocket carrying a byte stream in binary messages (the controller's
/// desktop stream, as noVNC uses it) as `Read + Write`: each write is one
/// message; reads take the bytes of messages in order.
pub struct WsStream {
    ws: tungstenite::WebSocket<TcpStream>,
    buf: Vec<u8>,
    at: usize,
}

impl WsStream {
    /// Wrap an open WebSocket.
    pub fn new(ws: tungstenite::WebSocket<TcpStream>) -> Self {
        WsStream {
            ws,
            buf: Vec::new(),
            at: 0,
        }
    }
}

impl Read for WsStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.buf.len() {
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(b)) => {
                    self.buf = b.to_vec();
                    self.at = 0;
                }
                Ok(tungstenite::Message::Close(_)) => return Ok(0),
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => return Ok(0),
                Err(tungstenite::Error::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for WsStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.ws
            .send(tungstenite::Message::Binary(data.to_vec().into()))
            .map_err(|e| match e {
                tungstenite::Error::Io(e) => e,
                e => io::Error::other(e),
            })?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ws.flush().map_err(|e| match e {
            tungstenite::Error::Io(e) => e,
            e => io::Error::other(e),
        })
    }
}
