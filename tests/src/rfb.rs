//! A minimal RFB (VNC) client, RFC 6143: enough to take a full-screen
//! screenshot of a desktop from outside its VM.
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

fn read_u8(s: &mut TcpStream) -> io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u16(s: &mut TcpStream) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut TcpStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_vec(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Connect to the RFB server at `addr` and capture one full frame.
pub fn capture(addr: &str, timeout: Duration) -> io::Result<Frame> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;

    // Version handshake.
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
    if read_u32(&mut s)? != 0 {
        return Err(proto("security handshake failed"));
    }

    // Init: shared session.
    s.write_all(&[1])?;
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
    // Full (non-incremental) update of the whole screen.
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&(width as u16).to_be_bytes());
    req.extend_from_slice(&(height as u16).to_be_bytes());
    s.write_all(&req)?;

    let mut pixels = vec![[0u8; 3]; width * height];
    let mut covered = vec![false; width * height];
    let mut left = width * height;
    while left > 0 {
        match read_u8(&mut s)? {
            0 => {
                read_u8(&mut s)?;
                let rects = read_u16(&mut s)?;
                for _ in 0..rects {
                    let hdr = read_vec(&mut s, 12)?;
                    let (x, y) = (u16_at(&hdr, 0) as usize, u16_at(&hdr, 2) as usize);
                    let (w, h) = (u16_at(&hdr, 4) as usize, u16_at(&hdr, 6) as usize);
                    let enc = i32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
                    if enc != 0 {
                        return Err(proto(format!("unrequested encoding {enc}")));
                    }
                    if x + w > width || y + h > height {
                        return Err(proto("rectangle outside the framebuffer"));
                    }
                    let data = read_vec(&mut s, w * h * 4)?;
                    for row in 0..h {
                        for col in 0..w {
                            let p = &data[(row * w + col) * 4..][..4];
                            let i = (y + row) * width + x + col;
                            // Little-endian 0x00RRGGBB: bytes B, G, R, 0.
                            pixels[i] = [p[2], p[1], p[0]];
                            if !covered[i] {
                                covered[i] = true;
                                left -= 1;
                            }
                        }
                    }
                }
                if left > 0 {
                    // Ask for the rest.
                    s.write_all(&req)?;
                }
            }
            1 => {
                read_u8(&mut s)?;
                read_u16(&mut s)?;
                let n = read_u16(&mut s)? as usize;
                read_vec(&mut s, n * 6)?;
            }
            2 => {}
            3 => {
                read_vec(&mut s, 3)?;
                let len = read_u32(&mut s)? as usize;
                if len > 16 << 20 {
                    return Err(proto("cut text too long"));
                }
                read_vec(&mut s, len)?;
            }
            t => return Err(proto(format!("unknown server message type {t}"))),
        }
    }
    Ok(Frame {
        width,
        height,
        name,
        pixels,
    })
}
