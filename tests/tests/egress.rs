//! Per-user egress end to end: real VMs whose only way out is the guest
//! proxy on 127.0.0.1:3128 → vsock → the host egress proxy → each user's
//! own upstream. Everything here stays on loopback: the "internet" is a test
//! HTTP server on 127.0.0.1 and the users' upstreams are test CONNECT proxies
//! that leave from distinct loopback source addresses (127.0.0.2, 127.0.0.3),
//! so the server can tell which upstream a request came through.

mod egress_support;

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use egress_support::{basic, exec, seen_now, start_http_upstream, start_server, unique, Seen};
use polydev_e2e::Host;

/// Size of the large response fetched from the server's `/big/<n>`.
const BIG: usize = 2 * 1024 * 1024;

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
        let (uport, auths) = start_http_upstream(source, Some(basic(user, &password)));
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
    // The server records a request once the client closed: wait for all 4.
    let all = host.wait_for(
        "the server to see 4 requests",
        Duration::from_secs(60),
        || {
            let s = seen_now(&seen);
            (s.len() >= 4).then_some(s)
        },
    );
    for (user, source, _, _, _) in &vms {
        let mine: Vec<&Seen> = all.iter().filter(|s| s.path.contains(user)).collect();
        assert_eq!(mine.len(), 2, "{user}: {all:?}");
        for s in mine {
            assert_eq!(s.peer.ip(), *source, "{user} left from {}: {s:?}", s.peer);
        }
    }
    // Each upstream saw exactly its user's credentials, and only those.
    for (user, _, password, auths, _) in &vms {
        let auths: Vec<String> = auths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| s.auth.clone())
            .collect();
        assert_eq!(auths.len(), 2, "{user}: {auths:?}");
        assert!(auths.iter().all(|a| *a == basic(user, password)), "{user}");
    }

    let (alice, ..) = &vms[0];
    // Large bodies both ways, and a body with a length, on the plain path.
    let r = exec(
        &host,
        alice,
        &format!("wget -q -O - http://127.0.0.1:{sport}/big/{BIG} | wc -c"),
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
    let paths: Vec<String> =
        host.wait_for("the server to record /one", Duration::from_secs(60), || {
            let paths: Vec<String> = seen_now(&seen).into_iter().map(|s| s.path).collect();
            paths.contains(&"/one".to_string()).then_some(paths)
        });
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
    let seen = host.wait_for("the server to record /ok", Duration::from_secs(60), || {
        let s = seen_now(&seen);
        (!s.is_empty()).then_some(s)
    });
    assert_eq!(seen.len(), 1, "only the allowed request arrived: {seen:?}");
    assert_eq!(seen[0].method, "GET");
    // No upstream → the server sees the host's own loopback address.
    assert_eq!(seen[0].peer.ip(), Ipv4Addr::LOCALHOST);
}
