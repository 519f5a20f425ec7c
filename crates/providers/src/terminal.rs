//! What a login prints, made readable and safe to show: terminal control
//! codes removed ([`strip_terminal_codes`]) and secrets redacted ([`redact`]).

/// Remove terminal control sequences (CSI/OSC escapes, carriage returns)
/// that CLIs drawing on a terminal leave in their output; a hyperlink's
/// target is kept as text.
pub fn strip_terminal_codes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\u{1b}' => match it.peek() {
                Some('[') => {
                    it.next();
                    // Parameters and intermediates, then one final byte.
                    for c in it.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    it.next();
                    // Until BEL or ST (ESC \).
                    let mut osc = String::new();
                    while let Some(c) = it.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            it.next();
                            break;
                        }
                        osc.push(c);
                    }
                    // A hyperlink (OSC 8 ; params ; target): keep its
                    // target, which is the whole URL (the visible text may
                    // be shortened), on a line of its own.
                    if let Some(target) = osc
                        .strip_prefix("8;")
                        .and_then(|r| r.split_once(';'))
                        .map(|(_, t)| t)
                        .filter(|t| !t.is_empty())
                    {
                        out.push('\n');
                        out.push_str(target);
                        out.push('\n');
                    }
                }
                _ => {
                    it.next();
                }
            },
            '\r' => {}
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// Replace what may be a secret — any run of 20 or more token characters
/// (letters, digits, `-_.~+%`), which covers OAuth codes, access and
/// refresh tokens, JWTs and API keys — by its first four characters and
/// `…<redacted>`. Words, paths (`/` splits runs), `key=value` names,
/// messages and short numbers stay readable.
pub fn redact(s: &str) -> String {
    fn token_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || "-_.~+%".contains(c)
    }
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().count() >= 20 {
            out.extend(run.chars().take(4));
            out.push_str("…<redacted>");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in s.chars() {
        if token_char(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_tokens_and_keeps_words() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        let text = format!(
            "login failed: access_denied: End-User aborted interaction\ncode=abcdefghijklmnopqrstuvwxyz012345 token {jwt} at /home/user/.testcli/auth.json"
        );
        let r = redact(&text);
        assert!(
            r.contains("login failed: access_denied: End-User aborted interaction"),
            "{r}"
        );
        assert!(r.contains("/home/user/.testcli/auth.json"), "{r}");
        assert!(!r.contains("abcdefghijklmnopqrstuvwxyz012345"), "{r}");
        assert!(r.contains("code=abcd…<redacted>"), "{r}");
        assert!(!r.contains(jwt), "{r}");
        assert!(!r.contains("c2lnbmF0dXJl"), "{r}");
        assert!(r.contains("…<redacted>"), "{r}");
    }

    #[test]
    fn terminal_codes_are_stripped() {
        let s = "\u{1b}[2J\u{1b}[1;31mError:\u{1b}[0m no\r\n\u{1b}]0;title\u{7}done";
        assert_eq!(strip_terminal_codes(s), "Error: no\ndone");
        // Claude Code prints its URL as a hyperlink with shortened text.
        let link = "visit:\n\u{1b}]8;;https://claude.ai/oauth/authorize?code=true&state=s\u{7}\u{1b}[94mhttps://claude.ai/oauth/authorize?z-Q5\u{1b}[39m\u{1b}]8;;\u{7}\n";
        let out = strip_terminal_codes(link);
        assert!(
            out.lines()
                .any(|l| l == "https://claude.ai/oauth/authorize?code=true&state=s"),
            "{out:?}"
        );
        assert!(!out.contains('\u{7}') && !out.contains('\u{1b}'), "{out:?}");
    }
}
