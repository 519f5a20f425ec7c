//! The host's reading of a guest's egress request line (the only bytes a
//! guest's egress connection sends before the policy decides): JSON, then
//! the target as the most permissive resolver would read it, then the deny
//! list. Never panics; an address literal is decided the same in every
//! spelling the parser accepts.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use polydev_host::egress::{deny_reason, parse_request, Target};

fuzz_target!(|data: &[u8]| {
    // A whole request line, and the bytes taken as the target host alone.
    if let Ok(req) = parse_request(data) {
        check_host(&req.host);
    }
    if let Ok(host) = std::str::from_utf8(data) {
        check_host(host);
    }
});

fn check_host(host: &str) {
    let own: [IpAddr; 1] = [IpAddr::from([203, 0, 113, 7])];
    if let Ok(Target::Addr(ip)) = Target::parse(host) {
        let why = deny_reason(ip, &own);
        // The canonical spelling of the address reads back as itself and
        // meets the same decision.
        let canonical = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        assert_eq!(Target::parse(&canonical), Ok(Target::Addr(ip)), "{host}");
        assert_eq!(deny_reason(ip, &own), why);
    }
}
