//! A user's upstream may be a SOCKS5 proxy (RFC 1928) with username and
//! password (RFC 1929): a real VM's requests leave through a test SOCKS5
//! upstream on loopback, which sees the credentials and the target *name*
//! (resolved by the upstream, as a residential provider does), while wrong
//! credentials are a clear 502 and a counted failure. All on loopback.

mod egress_support;

use std::net::Ipv4Addr;
use std::time::Duration;

use egress_support::{
    exec, sample, scrape, seen_now, start_server, start_socks5_upstream, unique, ProxySeen,
};
use polydev_e2e::Host;

#[test]
fn a_vm_leaves_through_its_socks5_upstream_with_username_and_password() {
    let host = Host::start();
    let (sport, seen) = start_server();
    let source = Ipv4Addr::new(127, 0, 0, 4);
    let password = unique("socks");
    let (uport, proxied) = start_socks5_upstream(source, "carol", &password);
    let upstream = format!("socks5://127.0.0.1:{uport}");
    // `localhost` resolves on the host to 127.0.0.1 and maybe ::1; both are
    // opened for the server's port so the name passes the deny list.
    let allow4 = format!("127.0.0.1:{sport}");
    let allow6 = format!("[::1]:{sport}");
    let vm = |name: &str, pass: &str| {
        let r = host.cli_env(
            &[
                "vm",
                "run",
                "--json",
                "--name",
                name,
                "--egress-upstream",
                &upstream,
                "--egress-upstream-user",
                "carol",
                "--egress-allow",
                &allow4,
                "--egress-allow",
                &allow6,
            ],
            &[("POLYDEV_EGRESS_PASSWORD", pass)],
        );
        assert_eq!(r.code, 0, "vm run: {}{}", r.stdout, r.stderr);
    };
    vm("carol", &password);

    // Plain HTTP by address (SOCKS5 ATYP 1).
    let r = exec(
        &host,
        "carol",
        &format!("wget -q -O - http://127.0.0.1:{sport}/by-address"),
    );
    assert_eq!(r.stdout, "hello GET /by-address body=0\n", "{}", r.stderr);
    // CONNECT to `localhost`: a loopback name is the loopback address to
    // the host's policy (never something an upstream may resolve its own
    // way), so the upstream gets the address the allow rule opened.
    let script = format!(
        "printf 'CONNECT localhost:{sport} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nGET /by-name HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | nc 127.0.0.1 3128"
    );
    let r = exec(&host, "carol", &script);
    assert!(
        r.stdout
            .starts_with("HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
            && r.stdout.ends_with("hello GET /by-name body=0\n"),
        "{:?} {}",
        r.stdout,
        r.stderr
    );
    let served = host.wait_for(
        "two requests at the server",
        Duration::from_secs(30),
        || {
            let s = seen_now(&seen);
            (s.len() == 2).then_some(s)
        },
    );
    for s in &served {
        assert_eq!(
            s.peer.ip(),
            source,
            "left through the SOCKS5 upstream: {s:?}"
        );
    }
    let creds = format!("carol:{password}");
    let got = proxied.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        got,
        vec![
            ProxySeen {
                target: format!("127.0.0.1:{sport}"),
                auth: creds.clone()
            },
            ProxySeen {
                target: format!("127.0.0.1:{sport}"),
                auth: creds.clone()
            },
        ]
    );

    // Wrong credentials: the upstream refuses, the guest gets a 502 that
    // says so, and the host counts an upstream refusal.
    vm("mallory", &unique("wrong"));
    let r = exec(
        &host,
        "mallory",
        &format!("printf 'CONNECT 127.0.0.1:{sport} HTTP/1.1\\r\\n\\r\\n' | nc 127.0.0.1 3128"),
    );
    assert!(
        r.stdout.starts_with("HTTP/1.1 502")
            && r.stdout.contains("rejected the upstream credentials"),
        "{:?}",
        r.stdout
    );
    // The guest has its answer before the host counts the connection.
    host.wait_for("the refusal to be counted", Duration::from_secs(30), || {
        let m = scrape(host.data());
        let key =
            "polydev_egress_connections_total{outcome=\"failed\",reason=\"upstream_refused\"}";
        (sample(&m, key) == 1.0).then_some(())
    });
    assert_eq!(seen_now(&seen).len(), 2, "nothing more reached the server");
    // Neither password is in the host agent's log or the egress logs.
    let logs = host.agent_log();
    assert!(!logs.contains(&password));
    for name in ["carol", "mallory"] {
        let info = host.inspect(name);
        let log =
            std::fs::read_to_string(host.data().join("vms").join(&info.id).join("egress.log"))
                .unwrap_or_default();
        assert!(
            log.contains(&format!("\"upstream\":\"127.0.0.1:{uport}\"")),
            "{log}"
        );
        assert!(!log.contains(&password), "{log}");
    }
}
