//! The mux frame decoder against arbitrary bytes in arbitrary read sizes:
//! it never panics, never holds more than its capacity, and every frame it
//! yields re-encodes to bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polydev_mux::frame::{Frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size, as a link delivers bytes in
    // whatever pieces it likes.
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1) * 97;
    let mut dec = FrameDecoder::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let piece = &rest[..step.min(rest.len())];
        let taken = dec.feed(piece);
        rest = &rest[taken..];
        while let Some(f) = dec.next_frame() {
            frames.push(f);
        }
        assert!(dec.buffered() <= FrameDecoder::CAPACITY);
        if taken == 0 {
            // A drained decoder always has room; no room means it is stuck.
            assert!(dec.buffered() < FrameDecoder::CAPACITY, "decoder stuck full");
        }
    }
    for f in frames {
        let mut wire = Vec::new();
        f.encode_into(&mut wire);
        let mut again = FrameDecoder::new();
        assert_eq!(again.feed(&wire), wire.len());
        assert_eq!(again.next_frame().as_ref(), Some(&f));
        assert_eq!(again.take_skipped(), (0, 0));
    }
});
