//! The terminal stream decoder against arbitrary bytes: it never panics,
//! stops at the first error, and every frame it yields encodes back to the
//! exact bytes it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polydev_api::pty::{PtyDecoder, PtyFrame};

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut dec = PtyDecoder::default();
    let mut decoded = Vec::new();
    'read: for piece in bytes.chunks(step) {
        dec.push(piece);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => decoded.push(f),
                Ok(None) => break,
                // The stream is closed after an error.
                Err(_) => break 'read,
            }
        }
    }
    // Data and resize frames are canonical on the wire, so the bytes they
    // came from are exactly their encodings, in order. (Exit payloads are
    // JSON, whose spelling is not unique.)
    let mut at = 0;
    for f in &decoded {
        let wire = f.encode();
        if !matches!(f, PtyFrame::Exit(_)) {
            assert_eq!(&bytes[at..at + wire.len()], &wire[..]);
            at += wire.len();
        } else {
            let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]);
            at += 5 + len as usize;
        }
        let mut again = PtyDecoder::default();
        again.push(&wire);
        assert_eq!(again.next_frame(), Ok(Some(f.clone())));
    }
});
