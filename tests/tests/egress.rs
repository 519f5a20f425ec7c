//! Per-user egress end to end: real VMs whose only way out is the guest
//! proxy on 127.0.0.1:3128 → vsock → the host egress proxy → each user's
//! own upstream. Everything here stays on loopback: the "internet" is a test
//! HTTP server on 127.0.0.1 and the users' upstreams are test CONNECT proxies
//! that leave from distinct loopback source addresses (127.0.0.2, 127.0.0.3),
//! so the server can tell which upstream a request came through.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use polydev_e2e::Host;

/// Size of the large response the server offers at `/big`.
const BIG: usize = 2 * 1024 * 1024;

/// One request as the test server saw it.
#[derive(Debug, Clone)]
struct Seen {
    peer: SocketAddr,
    method: String,
    path: String,
}

/// Read an HTTP head (up to the blank line) and its header map.
fn read_head(r: &mut BufReader<TcpStream>) -> Option<(String, Vec<(String, String)>)> {
    let mut first = String::new();
    if r.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Some((first.trim_end().to_string(), headers))
}

/// A tiny origin server: answers `hello <METHOD> <path> body=<n>` (or
/// [`BIG`] bytes at `/big`) and closes; records every request's peer.
fn start_server() -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind server");
    let port = l.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let peer = c.peer_addr().expect("peer");
                let mut w = c.try_clone().expect("clone");
                let mut r = BufReader::new(c);
                let Some((line, headers)) = read_head(&mut r) else {
                    return;
                };
                let mut parts = line.split(' ');
                let method = parts.next().unwrap_or_default().to_string();
                let path = parts.next().unwrap_or_default().to_string();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                log.lock().unwrap().push(Seen {
                    peer,
                    method: method.clone(),
                    path: path.clone(),
                });
                let payload = if path == "/big" {
                    vec![b'x'; BIG]
                } else {
                    format!("hello {method} {path} body={len}\n").into_bytes()
                };
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    payload.len()
                );
                let _ = w.write_all(&payload);
            });
        }
    });
    (port, seen)
}

/// A TCP connection to `to` from the loopback source address `from`.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sa = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own; on success it is
    // handed to TcpStream, on failure closed here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let src = sa(SocketAddrV4::new(from, 0));
        let dst = sa(to);
        if libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len) < 0
            || libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len) < 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// A user's upstream: an HTTP CONNECT proxy that demands `expected` as
/// `Proxy-Authorization` (407 otherwise), records what it received, and
/// leaves from `source`.
fn start_upstream(source: Ipv4Addr, expected: String) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let port = l.local_addr().expect("addr").port();
    let auths = Arc::new(Mutex::new(Vec::new()));
    let log = auths.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let log = log.clone();
            let expected = expected.clone();
            std::thread::spawn(move || {
                let mut w = c.try_clone().expect("clone");
                let mut r = BufReader::new(c);
                let Some((line, headers)) = read_head(&mut r) else {
                    return;
                };
                let auth = headers
                    .iter()
                    .find(|(k, _)| k == "proxy-authorization")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                log.lock().unwrap().push(auth.clone());
                if auth != expected {
                    let _ = w.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
                    return;
                }
                let target: Option<SocketAddr> = line
                    .strip_prefix("CONNECT ")
                    .and_then(|t| t.split(' ').next())
                    .and_then(|t| t.parse().ok());
                let Some(out) = target.and_then(|t| connect_from(source, t).ok()) else {
                    let _ = w.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                    return;
                };
                let _ = w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                // The BufReader may hold tunnel bytes already: drain it first.
                let pending = r.buffer().to_vec();
                let c = r.into_inner();
                let mut out_w = out.try_clone().expect("clone");
                let mut out_r = out;
                let up = std::thread::spawn(move || {
                    let mut c = c;
                    let _ = out_w.write_all(&pending);
                    let _ = std::io::copy(&mut c, &mut out_w);
                    let _ = out_w.shutdown(Shutdown::Write);
                });
                let _ = std::io::copy(&mut out_r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    (port, auths)
}

fn basic(user: &str, pass: &str) -> String {
    // A tiny base64 encoder: the test should not trust the code under test
    // to compute what it checks.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for ch in raw.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= ch.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

fn unique(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("pw-{tag}-{}-{n}", std::process::id())
}

fn exec(host: &Host, vm: &str, script: &str) -> polydev_e2e::Run {
    host.cli(&[
        "vm",
        "exec",
        vm,
        "--timeout",
        "60",
        "--",
        "sh",
        "-c",
        script,
    ])
}

#[test]
fn each_users_vm_leaves_through_its_own_upstream_and_never_sees_its_password() {
    let host = Host::start();
    let (sport, seen) = start_server();
    let users = [
        ("alice", Ipv4Addr::new(127, 0, 0, 2)),
        ("bob", Ipv4Addr::new(127, 0, 0, 3)),
    ];
    let mut vms = Vec::new();
    for (user, source) in users {
        let password = unique(user);
        let (uport, auths) = start_upstream(source, basic(user, &password));
        let upstream = format!("http://127.0.0.1:{uport}");
        let allow = format!("127.0.0.1:{sport}");
        let r = host.cli_env(
            &[
                "vm",
                "run",
                "--json",
                "--name",
                user,
                "--egress-upstream",
                &upstream,
                "--egress-upstream-user",
                user,
                "--egress-allow",
                &allow,
            ],
            &[("POLYDEV_EGRESS_PASSWORD", &password)],
        );
        assert_eq!(r.code, 0, "vm run: {}{}", r.stdout, r.stderr);
        vms.push((user, source, password, auths, uport));
    }

    for (user, _, _, _, _) in &vms {
        // Plain HTTP through the shim (busybox wget sends absolute-form).
        let url = format!("http://127.0.0.1:{sport}/from-{user}");
        let r = exec(&host, user, &format!("wget -q -O - {url}"));
        assert_eq!(r.code, 0, "{user}: wget failed: {}", r.stderr);
        assert_eq!(r.stdout, format!("hello GET /from-{user} body=0\n"));

        // CONNECT, with a half-close from the client (nc shuts its write
        // side at the end of stdin and still reads the answer).
        let script = format!(
            "printf 'CONNECT 127.0.0.1:{sport} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nGET /tunnel-{user} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | nc 127.0.0.1 3128"
        );
        let r = exec(&host, user, &script);
        assert!(
            r.stdout
                .starts_with("HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK"),
            "{user}: CONNECT: {:?} {}",
            r.stdout,
            r.stderr
        );
        assert!(r
            .stdout
            .ends_with(&format!("hello GET /tunnel-{user} body=0\n")));
    }

    // Every request reached the server from its user's upstream address.
    let all = seen_now(&seen);
    for (user, source, _, _, _) in &vms {
        let mine: Vec<&Seen> = all.iter().filter(|s| s.path.contains(user)).collect();
        assert_eq!(mine.len(), 2, "{user}: {all:?}");
        for s in mine {
            assert_eq!(s.peer.ip(), *source, "{user} left from {}: {s:?}", s.peer);
        }
    }
    // Each upstream saw exactly its user's credentials, and only those.
    for (user, _, password, auths, _) in &vms {
        let auths = auths.lock().unwrap().clone();
        assert_eq!(auths.len(), 2, "{user}: {auths:?}");
        assert!(auths.iter().all(|a| *a == basic(user, password)), "{user}");
    }

    let (alice, ..) = &vms[0];
    // Large bodies both ways, and a body with a length, on the plain path.
    let r = exec(
        &host,
        alice,
        &format!("wget -q -O - http://127.0.0.1:{sport}/big | wc -c"),
    );
    assert_eq!(r.stdout.trim(), BIG.to_string(), "{}", r.stderr);
    let script = format!(
        "dd if=/dev/zero of=/tmp/up bs=1024 count=1536 2>/dev/null && \
         {{ printf 'POST http://127.0.0.1:{sport}/upload HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 1572864\\r\\n\\r\\n'; cat /tmp/up; }} | nc 127.0.0.1 3128"
    );
    let r = exec(&host, alice, &script);
    assert!(
        r.stdout.ends_with("hello POST /upload body=1572864\n"),
        "{:?} {}",
        r.stdout,
        r.stderr
    );
    // Keep-alive: a second request on the same client connection is never
    // forwarded on the first one's stream; the client sees the close.
    let script = format!(
        "printf 'GET http://127.0.0.1:{sport}/one HTTP/1.1\\r\\nHost: a\\r\\n\\r\\nGET http://127.0.0.1:{sport}/two HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n' | nc 127.0.0.1 3128"
    );
    let r = exec(&host, alice, &script);
    assert!(r.stdout.contains("hello GET /one"), "{:?}", r.stdout);
    assert!(!r.stdout.contains("/two"), "{:?}", r.stdout);
    let paths: Vec<String> = seen_now(&seen).into_iter().map(|s| s.path).collect();
    assert!(paths.contains(&"/one".to_string()), "{paths:?}");
    assert!(!paths.contains(&"/two".to_string()), "{paths:?}");

    // The proxy settings are there by default; the password is nowhere in
    // the VM: not in any process's environment or command line, not in any
    // file. `[p]w-…` matches the password but not the grep's own argv.
    let scan = |pattern: &str| {
        format!(
            "for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do grep -l '{pattern}' $f 2>/dev/null; done; \
             find / \\( -path /proc -o -path /sys \\) -prune -o -type f -print 2>/dev/null | xargs grep -l '{pattern}' 2>/dev/null; \
             ps | grep -c '{pattern}'; echo scanned"
        )
    };
    // Control: the scan does find a canary in an environment and a file.
    let canary = unique("canary");
    let r = host.cli(&[
        "vm",
        "exec",
        alice,
        "--env",
        &format!("CANARY={canary}"),
        "--",
        "sh",
        "-c",
        &format!(
            "echo {canary} > /tmp/canary-file; {}",
            scan(&format!("[{}]{}", &canary[..1], &canary[1..]))
        ),
    ]);
    assert!(
        r.stdout.contains("/environ") && r.stdout.contains("/tmp/canary-file"),
        "the scan must be able to find things: {}",
        r.stdout
    );
    for (user, _, password, _, _) in &vms {
        let r = exec(&host, user, "echo $HTTP_PROXY $https_proxy $NO_PROXY");
        assert_eq!(
            r.stdout,
            "http://127.0.0.1:3128 http://127.0.0.1:3128 localhost,127.0.0.1\n"
        );
        let pattern = format!("[{}]{}", &password[..1], &password[1..]);
        let script = scan(&pattern);
        let r = exec(&host, user, &script);
        assert_eq!(
            r.stdout, "0\nscanned\n",
            "{user}: password found in the VM: {}",
            r.stdout
        );
    }

    // Nor does the host show it: not in inspect, ls, logs or records
    // readable by others; the live record holding it is mode 0600.
    for (user, _, password, _, uport) in &vms {
        let inspect = host.ok(&["vm", "inspect", user]).stdout;
        let ls = host.ok(&["vm", "ls", "--json"]).stdout;
        assert!(!inspect.contains(password.as_str()) && !ls.contains(password.as_str()));
        let info = host.inspect(user);
        let dir = host.data().join("vms").join(&info.id);
        let egress_log = std::fs::read_to_string(dir.join("egress.log")).unwrap_or_default();
        assert!(
            egress_log.contains(&format!("\"upstream\":\"127.0.0.1:{uport}\"")),
            "{egress_log}"
        );
        assert!(!egress_log.contains(password.as_str()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("vm.json"))
            .expect("record")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "vm.json is private: {mode:o}");
        host.ok(&["vm", "rm", user]);
        let archived = host.data().join("logs").join(&info.id);
        let kept = std::fs::read_to_string(archived.join("vm.json")).expect("archived record");
        assert!(!kept.contains(password.as_str()), "archived record: {kept}");
        assert!(archived.join("egress.log").is_file(), "egress.log archived");
    }
    assert!(!vms
        .iter()
        .any(|(_, _, p, _, _)| host.agent_log().contains(p.as_str())));
}

fn seen_now(seen: &Arc<Mutex<Vec<Seen>>>) -> Vec<Seen> {
    seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[test]
fn the_host_its_neighbours_and_metadata_are_refused_and_there_is_no_other_way_out() {
    let host = Host::start();
    let (sport, seen) = start_server();
    // Direct egress, with one loopback port opened: the most permissive
    // policy still refuses everything not explicitly allowed.
    let allow = format!("127.0.0.1:{sport}");
    host.run_vm(&["--name", "d", "--egress-direct", "--egress-allow", &allow]);
    let r = exec(
        &host,
        "d",
        &format!("wget -q -O - http://127.0.0.1:{sport}/ok"),
    );
    assert_eq!(r.stdout, "hello GET /ok body=0\n", "{}", r.stderr);

    // The host agent's own port (another loopback port), a private range,
    // link-local metadata: refused by the host with a reason.
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    let oport = other.local_addr().expect("addr").port();
    for (target, why) in [
        (format!("127.0.0.1:{oport}"), "loopback"),
        ("10.1.2.3:80".to_string(), "private range"),
        ("169.254.169.254:80".to_string(), "metadata"),
    ] {
        let r = exec(&host, "d", &format!("wget -q -O - http://{target}/x"));
        assert_ne!(r.code, 0, "{target} must be refused");
        assert!(r.stderr.contains("403"), "{target}: {}", r.stderr);
        let r = exec(
            &host,
            "d",
            &format!("printf 'CONNECT {target} HTTP/1.1\\r\\n\\r\\n' | nc 127.0.0.1 3128"),
        );
        assert!(
            r.stdout.starts_with("HTTP/1.1 403 Forbidden") && r.stdout.contains(why),
            "{target}: {:?}",
            r.stdout
        );
        let vm = host.inspect("d");
        let log = std::fs::read_to_string(host.data().join("vms").join(&vm.id).join("egress.log"))
            .unwrap_or_default();
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("\"target\":\"{target}\""))
                    && l.contains("\"outcome\":\"denied\"")
                    && l.contains(why)),
            "{target} refusal logged: {log}"
        );
    }
    other.set_nonblocking(true).expect("nonblocking listener");
    assert!(other.accept().is_err(), "nothing reached the refused port");

    // A VM without any egress policy cannot leave at all.
    host.run_vm(&["--name", "none"]);
    let r = exec(
        &host,
        "none",
        &format!("wget -q -O - http://127.0.0.1:{sport}/no"),
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("403"), "{}", r.stderr);

    // No interface but loopback, and a direct connection goes nowhere.
    let r = exec(&host, "d", "ls /sys/class/net");
    assert_eq!(r.stdout.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    let r = exec(&host, "d", "nc -w 3 192.0.2.1 80 </dev/null; echo rc=$?");
    assert!(r.stdout.contains("rc=1"), "{} {}", r.stdout, r.stderr);
    let r = exec(
        &host,
        "d",
        &format!("nc -w 3 127.0.0.1 {sport} </dev/null; echo rc=$?"),
    );
    assert!(
        r.stdout.contains("rc=1"),
        "guest loopback is not the host's: {}",
        r.stdout
    );
    let seen = seen_now(&seen);
    assert_eq!(seen.len(), 1, "only the allowed request arrived: {seen:?}");
    assert_eq!(seen[0].method, "GET");
    // No upstream → the server sees the host's own loopback address.
    assert_eq!(seen[0].peer.ip(), Ipv4Addr::LOCALHOST);
}
