//! `polydev-egress-flood PROXY TARGET COUNT [THREADS]`: opens COUNT
//! connections to the guest's egress proxy, each asking to `CONNECT` to
//! TARGET, and reads each answer to its end. A test copies it into a VM to
//! play a guest that floods the host with refused connections (each one a
//! line in the host's `egress.log`): a shell loop of `nc` spends ~20 ms per
//! connection on forking under TCG, this a fraction of that.
//!
//! Prints `flooded COUNT: REFUSED refused, OTHER other answers`; exits 1 if
//! a connection could not be made.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counts shared by the threads.
#[derive(Default)]
struct Tally {
    refused: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
}

fn one(proxy: &str, request: &[u8], tally: &Tally) {
    let answer = (|| -> std::io::Result<Vec<u8>> {
        let mut c = TcpStream::connect(proxy)?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        c.write_all(request)?;
        let mut answer = Vec::new();
        c.take(4096).read_to_end(&mut answer)?;
        Ok(answer)
    })();
    let counter = match answer {
        Ok(a) if a.starts_with(b"HTTP/1.1 403") || a.starts_with(b"HTTP/1.1 502") => &tally.refused,
        Ok(_) => &tally.other,
        Err(_) => &tally.errors,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: polydev-egress-flood PROXY TARGET COUNT [THREADS]";
    let (Some(proxy), Some(target), Some(count)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Ok(count) = count.parse::<u64>() else {
        eprintln!("COUNT must be a number\n{usage}");
        return ExitCode::from(2);
    };
    let threads = match args.get(4).map(|t| t.parse::<u64>()) {
        None => 4,
        Some(Ok(t)) if (1..=64).contains(&t) => t,
        Some(_) => {
            eprintln!("THREADS must be 1 to 64\n{usage}");
            return ExitCode::from(2);
        }
    };
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    let tally = Tally::default();
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    one(proxy, &request, &tally);
                }
            });
        }
    });
    let errors = tally.errors.load(Ordering::Relaxed);
    println!(
        "flooded {count}: {} refused, {} other answers, {errors} failed",
        tally.refused.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
