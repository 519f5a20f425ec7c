//! A browser VM's traffic leaves only through its user's upstream: the
//! desktop's own Chromium loads a page from a test server, and a CLI's
//! HTTPS request is tunnelled with CONNECT to a TLS test server whose CA
//! the test generates now (rcgen) and installs in the VM now.
//!
//! All traffic stays on loopback. The user's upstream is the test's
//! stand-in for the internet: it maps the documentation address
//! 198.51.100.7 (RFC 5737), ports 80 and 443, to the loopback test
//! servers. A public-looking address is what makes this real: Chromium
//! never proxies loopback addresses, and the host's deny list refuses them
//! unless opened; 198.51.100.7 takes the same path as any internet host
//! (guest shim → vsock → host egress proxy → upstream CONNECT).

mod egress_support;

use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_support::{
    basic, exec, seen_now, serve_one, start_http_upstream_routed, start_server, unique, SeenLog,
};
use polydev_e2e::Host;

/// The "internet" address the upstream maps to the loopback servers.
const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// Desktop readiness under TCG on a loaded 2-core host can take minutes.
const DESKTOP_DEADLINE: Duration = Duration::from_secs(400);

/// A fresh CA and a server certificate for [`PUBLIC`] signed by it: the
/// CA's PEM, and the server's rustls configuration.
fn test_pki() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("polydev egress test CA {}", unique("ca")),
    );
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().expect("server key");
    let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("server params");
    leaf.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(PUBLIC))];
    leaf.distinguished_name
        .push(DnType::CommonName, PUBLIC.to_string());
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("sign server");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
    (ca_cert.pem(), Arc::new(config))
}

/// A TLS origin server on 127.0.0.1 (same answers as the plain one);
/// records requests that completed a handshake and a request.
fn start_tls_server(config: Arc<rustls::ServerConfig>) -> (u16, SeenLog, Arc<Mutex<u32>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind TLS server");
    let port = l.local_addr().expect("addr").port();
    let seen: SeenLog = Arc::new(Mutex::new(Vec::new()));
    let handshakes_failed = Arc::new(Mutex::new(0u32));
    let (log, failed) = (seen.clone(), handshakes_failed.clone());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let (log, failed, config) = (log.clone(), failed.clone(), config.clone());
            std::thread::spawn(move || {
                let Ok(peer) = c.peer_addr() else {
                    return;
                };
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, c);
                // Finish the handshake first, so a client that rejects our
                // certificate is counted (it never sends a request).
                while tls.conn.is_handshaking() {
                    if tls.conn.complete_io(&mut tls.sock).is_err() {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                        return;
                    }
                }
                serve_one(tls, peer, &log, |t| {
                    t.conn.send_close_notify();
                    let _ = t.conn.complete_io(&mut t.sock);
                    let _ = t.sock.shutdown(Shutdown::Write);
                });
            });
        }
    });
    (port, seen, handshakes_failed)
}

#[test]
fn chromium_and_a_cli_in_a_browser_vm_leave_through_the_users_upstream() {
    polydev_e2e::require_images(&["browser"]);
    let host = Host::start();
    let (sport, seen) = start_server();
    let (ca_pem, tls_config) = test_pki();
    let (tport, tls_seen, tls_failed) = start_tls_server(tls_config);
    let source = Ipv4Addr::new(127, 0, 0, 5);
    let password = unique("dana");
    let loopback = |p: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
    let (uport, proxied) = start_http_upstream_routed(
        source,
        Some(basic("dana", &password)),
        vec![
            (format!("{PUBLIC}:80"), loopback(sport)),
            (format!("{PUBLIC}:443"), loopback(tport)),
        ],
    );
    let upstream = format!("http://127.0.0.1:{uport}");
    let r = host.cli_env(
        &[
            "vm",
            "run",
            "--json",
            "--name",
            "dana",
            "--image",
            "browser",
            "--memory",
            "2048",
            "--vcpus",
            "2",
            "--egress-upstream",
            &upstream,
            "--egress-upstream-user",
            "dana",
        ],
        &[("POLYDEV_EGRESS_PASSWORD", &password)],
    );
    assert_eq!(r.code, 0, "vm run: {}{}", r.stdout, r.stderr);
    let t = Instant::now();

    // A CLI's HTTPS request, before the desktop is up (it needs none).
    // Without the test CA, TLS fails: the tunnel is end to end, nothing in
    // between terminates it.
    let path = format!("/tls-{}", std::process::id());
    let curl = format!("runuser -u user -- curl -sS --max-time 90 https://{PUBLIC}{path}");
    let r = exec(&host, "dana", &curl);
    assert_ne!(r.code, 0, "curl must not trust an unknown CA: {}", r.stdout);
    assert!(
        r.stderr.to_ascii_lowercase().contains("certificate"),
        "{}",
        r.stderr
    );
    host.wait_for(
        "the refused handshake at the TLS server",
        Duration::from_secs(30),
        || (*tls_failed.lock().unwrap_or_else(|p| p.into_inner()) >= 1).then_some(()),
    );
    // Install the CA in the VM's system store (the root filesystem is a
    // read-only image with a tmpfs overlay: this lives as long as the VM).
    let install = format!(
        "mkdir -p /usr/local/share/ca-certificates && \
         printf '%s\\n' '{}' > /usr/local/share/ca-certificates/polydev-egress-test.crt && \
         update-ca-certificates >/dev/null 2>&1 && echo installed",
        ca_pem.trim()
    );
    let r = exec(&host, "dana", &install);
    assert_eq!(r.stdout, "installed\n", "{}", r.stderr);
    let r = exec(&host, "dana", &curl);
    assert_eq!(r.code, 0, "curl over TLS: {}", r.stderr);
    assert_eq!(r.stdout, format!("hello GET {path} body=0\n"));
    let tls = host.wait_for("the TLS server to record", Duration::from_secs(60), || {
        let s = seen_now(&tls_seen);
        s.iter().any(|s| s.path == path).then_some(s)
    });
    for s in tls.iter().filter(|s| s.path == path) {
        assert_eq!(s.peer.ip(), IpAddr::V4(source), "via the upstream: {s:?}");
    }

    // Chromium on the desktop (the one the user sees) opens a page: the
    // URL goes to the running browser, which fetches it through the proxy
    // and shows its title in the window name.
    host.wait_for("the Chromium window", DESKTOP_DEADLINE, || {
        let r = exec(&host, "dana", "DISPLAY=:0 xwininfo -root -tree");
        r.stdout
            .contains("(\"chromium\" \"Chromium\")")
            .then_some(())
    });
    eprintln!("desktop Chromium up {:?} after vm run", t.elapsed());
    let page = format!("/page-{}", std::process::id());
    let open = format!(
        "timeout 100 runuser -u user -- env DISPLAY=:0 HOME=/home/user chromium http://{PUBLIC}{page} >/dev/null 2>&1; echo handed-over"
    );
    let r = exec(&host, "dana", &open);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let title = format!("polydev{page} - Chromium");
    let tree = host.wait_for(
        "the page's title on the Chromium window",
        DESKTOP_DEADLINE,
        || {
            let r = exec(&host, "dana", "DISPLAY=:0 xwininfo -root -tree");
            r.stdout.contains(&title).then_some(r.stdout)
        },
    );
    eprintln!("page shown {:?} after vm run", t.elapsed());
    assert!(tree.contains(&title));
    let served = seen_now(&seen);
    let hits: Vec<_> = served.iter().filter(|s| s.path == page).collect();
    assert!(!hits.is_empty(), "{served:?}");
    for s in &hits {
        assert_eq!(s.method, "GET");
        assert_eq!(s.peer.ip(), IpAddr::V4(source), "via the upstream: {s:?}");
    }

    // The upstream saw CONNECTs for both, each with the user's credentials.
    let got = proxied.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for target in [format!("{PUBLIC}:443"), format!("{PUBLIC}:80")] {
        assert!(got.iter().any(|p| p.target == target), "{target}: {got:?}");
    }
    assert!(
        got.iter().all(|p| p.auth == basic("dana", &password)),
        "{got:?}"
    );
    // And the host logged them under this VM.
    let info = host.inspect("dana");
    let log = std::fs::read_to_string(host.data().join("vms").join(&info.id).join("egress.log"))
        .unwrap_or_default();
    for target in [format!("{PUBLIC}:443"), format!("{PUBLIC}:80")] {
        assert!(
            log.contains(&format!("\"target\":\"{target}\"")),
            "{target}: {log}"
        );
    }
    assert!(!log.contains(&password));
}
