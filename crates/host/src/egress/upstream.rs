//! Asking the user's upstream proxy for a tunnel: HTTP `CONNECT` or SOCKS5.

use std::net::IpAddr;

use polydev_api::vm::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Ask an HTTP proxy for a tunnel: `CONNECT host:port` with
/// `Proxy-Authorization` when configured; any 2xx opens it.
pub(super) async fn http_connect(
    s: &mut TcpStream,
    host: &str,
    port: u16,
    auth: Option<&str>,
) -> std::io::Result<()> {
    let target = join_host_port(host, port);
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = auth {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    let (code, line) = read_status(s).await?;
    if !(200..300).contains(&code) {
        return Err(std::io::Error::other(format!(
            "refused CONNECT {target}: {line}"
        )));
    }
    Ok(())
}

/// SOCKS5 `CONNECT` (RFC 1928) with username/password authentication (RFC
/// 1929) when configured — and then only that method is offered, so a
/// proxy cannot silently skip authentication. Names go as names (ATYP 3),
/// resolved by the proxy like the HTTP upstream's.
pub(super) async fn socks5_connect(
    s: &mut TcpStream,
    host: &str,
    port: u16,
    auth: Option<&(String, Secret)>,
) -> std::io::Result<()> {
    let proto = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let method = if auth.is_some() { 0x02 } else { 0x00 };
    s.write_all(&[0x05, 0x01, method]).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    if choice[0] != 0x05 {
        return Err(proto(format!(
            "not a SOCKS5 proxy (version byte {})",
            choice[0]
        )));
    }
    if choice[1] != method {
        return Err(std::io::Error::other(if auth.is_some() {
            "SOCKS5 proxy does not accept username/password authentication"
        } else {
            "SOCKS5 proxy requires authentication, and this VM's upstream has no credentials"
        }));
    }
    if let Some((user, pass)) = auth {
        // Lengths were checked to fit one byte when the policy was compiled.
        let (u, p) = (user.as_bytes(), pass.expose().as_bytes());
        let mut msg = Vec::with_capacity(3 + u.len() + p.len());
        msg.push(0x01);
        msg.push(u.len() as u8);
        msg.extend_from_slice(u);
        msg.push(p.len() as u8);
        msg.extend_from_slice(p);
        s.write_all(&msg).await?;
        let mut status = [0u8; 2];
        s.read_exact(&mut status).await?;
        if status[1] != 0x00 {
            return Err(std::io::Error::other(
                "SOCKS5 proxy rejected the upstream credentials",
            ));
        }
    }
    let mut req = vec![0x05, 0x01, 0x00];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            req.push(0x01);
            req.extend_from_slice(&v4.octets());
        }
        Ok(IpAddr::V6(v6)) => {
            req.push(0x04);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            // read_request caps names at 253 bytes.
            let name = host.as_bytes();
            let len = u8::try_from(name.len())
                .map_err(|_| proto(format!("name {host} is too long for SOCKS5")))?;
            req.push(0x03);
            req.push(len);
            req.extend_from_slice(name);
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[0] != 0x05 {
        return Err(proto(format!("bad SOCKS5 reply version {}", head[0])));
    }
    if head[1] != 0x00 {
        return Err(std::io::Error::other(format!(
            "SOCKS5 CONNECT {} refused: {}",
            join_host_port(host, port),
            socks5_reply_text(head[1])
        )));
    }
    // Skip the bound address; the tunnel's bytes follow it.
    let skip = match head[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            usize::from(len[0])
        }
        t => return Err(proto(format!("bad SOCKS5 address type {t}"))),
    };
    let mut rest = vec![0u8; skip + 2];
    s.read_exact(&mut rest).await?;
    Ok(())
}

/// RFC 1928 §6 reply codes.
fn socks5_reply_text(code: u8) -> String {
    match code {
        0x01 => "general SOCKS server failure".into(),
        0x02 => "connection not allowed by ruleset".into(),
        0x03 => "network unreachable".into(),
        0x04 => "host unreachable".into(),
        0x05 => "connection refused".into(),
        0x06 => "TTL expired".into(),
        0x07 => "command not supported".into(),
        0x08 => "address type not supported".into(),
        c => format!("reply code {c}"),
    }
}

/// Read an HTTP response head up to the blank line (byte by byte, so the
/// tunnel's first bytes stay unread); returns the status code and line.
async fn read_status(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before answering CONNECT",
            ));
        }
        head.push(b[0]);
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response head too long",
            ));
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default().to_string();
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    Ok((code, line))
}

/// `host:port`, with IPv6 addresses in brackets (once: a guest may have
/// sent them bracketed).
pub(super) fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// A scripted SOCKS5 server: checks the client's bytes exactly and
    /// answers with `rep`.
    async fn socks5_server(rep: u8) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut greet = [0u8; 3];
            c.read_exact(&mut greet).await.unwrap();
            seen.extend_from_slice(&greet);
            c.write_all(&[5, 2]).await.unwrap();
            let mut auth = [0u8; 1 + 1 + 5 + 1 + 6];
            c.read_exact(&mut auth).await.unwrap();
            seen.extend_from_slice(&auth);
            c.write_all(&[1, 0]).await.unwrap();
            let mut req = [0u8; 4 + 1 + 11 + 2];
            c.read_exact(&mut req).await.unwrap();
            seen.extend_from_slice(&req);
            // A domain-name bound address, to exercise that branch.
            c.write_all(&[5, rep, 0, 3, 2, b'o', b'k', 0, 80])
                .await
                .unwrap();
            if rep == 0 {
                c.write_all(b"tunnel").await.unwrap();
            }
            seen
        });
        (addr, task)
    }

    #[tokio::test]
    async fn socks5_handshake_is_rfc1928_with_rfc1929_auth() {
        let creds = ("alice".to_string(), Secret::new("s3cret"));
        let (addr, server) = socks5_server(0).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        socks5_connect(&mut s, "example.com", 443, Some(&creds))
            .await
            .unwrap();
        let mut rest = [0u8; 6];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"tunnel", "the reply is consumed exactly");
        let mut want = vec![5, 1, 2, 1, 5];
        want.extend_from_slice(b"alice");
        want.push(6);
        want.extend_from_slice(b"s3cret");
        want.extend_from_slice(&[5, 1, 0, 3, 11]);
        want.extend_from_slice(b"example.com");
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(server.await.unwrap(), want);

        let (addr, _server) = socks5_server(5).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let e = socks5_connect(&mut s, "example.com", 443, Some(&creds))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("connection refused"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn ipv6_targets_are_bracketed() {
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("a.b", 80), "a.b:80");
        assert_eq!(join_host_port("[::1]", 80), "[::1]:80");
    }
}
