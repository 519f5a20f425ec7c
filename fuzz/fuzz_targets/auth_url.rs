//! Auth-URL recognition in what a login printed: terminal codes stripped,
//! then each built-in provider's pattern. Never panics, and a URL found is
//! a piece of the cleaned text, with no whitespace or control characters.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use polydev_providers::terminal::strip_terminal_codes;
use polydev_providers::Providers;

fn providers() -> &'static Providers {
    static P: OnceLock<Providers> = OnceLock::new();
    P.get_or_init(|| Providers::builtin().expect("built-in providers parse"))
}

fuzz_target!(|data: &[u8]| {
    let text = strip_terminal_codes(&String::from_utf8_lossy(data));
    assert!(!text.contains('\u{1b}'), "an escape survived: {text:?}");
    for p in providers().iter() {
        if let Some(url) = p.find_auth_url(&text) {
            assert!(text.contains(&url), "{url:?} is not in {text:?}");
            assert!(
                !url.chars().any(|c| c.is_whitespace() || c.is_control()),
                "{url:?}"
            );
        }
    }
});
