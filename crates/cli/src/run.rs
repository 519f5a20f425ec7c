//! `polydev run --provider P "prompt"`: run a prompt with a connected
//! provider's CLI in the caller's CLI VM through the controller's API,
//! print its events as they come, and exit with the run's exit status.
//!
//! Authenticates like any API client: a bearer API token (`pdt_…`, made in
//! the dashboard or with `POST /api/v1/tokens`) from `--token` or
//! `$POLYDEV_TOKEN`, sent to `--url` (`$POLYDEV_URL`). The event stream is
//! the run's SSE (`GET /api/v1/runs/{id}/events`); a stream that breaks
//! (a controller restart) is opened again with `Last-Event-ID`, so nothing
//! is printed twice or missed.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

/// `polydev run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The controller's address.
    #[arg(long, env = "POLYDEV_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API token (`pdt_…`) with the `vms:read` and `vms:write` scopes.
    #[arg(long, env = "POLYDEV_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The connected provider whose CLI runs the prompt (`claude-code`,
    /// `codex`, `gemini-cli`, …).
    #[arg(long)]
    pub provider: String,
    /// Working directory in the CLI VM (absolute, or relative to the home
    /// directory; default: the home directory).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Stop the run after this many seconds (default: the server's, 3600).
    #[arg(long)]
    pub timeout_secs: Option<u32>,
    /// Print every event as one JSON line (as the API gives it) instead of
    /// its text.
    #[arg(long)]
    pub json: bool,
    /// The prompt.
    pub prompt: String,
}

/// How long a broken event stream is retried without any progress.
const RECONNECT_FOR: Duration = Duration::from_secs(180);

/// Run it; the exit code is the run's (0 succeeded; the command's own
/// non-zero code; 1 for a run that failed without one, was lost or
/// cancelled).
pub async fn run(a: RunArgs) -> anyhow::Result<i32> {
    let base = a.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let mut body = json!({ "provider": a.provider, "prompt": a.prompt });
    if let Some(c) = &a.cwd {
        body["cwd"] = json!(c);
    }
    if let Some(t) = a.timeout_secs {
        body["options"] = json!({ "timeout_secs": t });
    }
    let r = client
        .post(format!("{base}/api/v1/runs"))
        .bearer_auth(&a.token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the controller at {base}: is it running (polydev up)?")
        })?;
    let status = r.status();
    let created = json_of(r)
        .await
        .context("the controller's answer is not JSON")?;
    if !status.is_success() {
        bail!("{}", problem_text(status.as_u16(), &created));
    }
    let Some(id) = created["id"].as_str().map(str::to_string) else {
        bail!("the controller's answer names no run: {created}");
    };
    eprintln!("run {id} ({})", created["state"].as_str().unwrap_or("?"));
    let mut printer = Printer::new(a.json);
    let mut last: Option<i64> = None;
    let mut progress = Instant::now();
    loop {
        match follow(&client, &base, &a.token, &id, &mut last, &mut printer).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => eprintln!("event stream of {id} broke: {e:#}; reconnecting"),
        }
        if printer.seen > 0 {
            progress = Instant::now();
            printer.seen = 0;
        }
        if progress.elapsed() > RECONNECT_FOR {
            bail!(
                "lost the event stream of run {id} for {} s; see GET {base}/api/v1/runs/{id}",
                RECONNECT_FOR.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    printer.finish();
    let r = client
        .get(format!("{base}/api/v1/runs/{id}"))
        .bearer_auth(&a.token)
        .send()
        .await
        .context("reading the finished run")?;
    let status = r.status();
    let run = json_of(r).await.context("the run is not JSON")?;
    if !status.is_success() {
        bail!("{}", problem_text(status.as_u16(), &run));
    }
    let state = run["state"].as_str().unwrap_or("?");
    let code = run["exit_code"].as_i64();
    if state != "succeeded" {
        eprintln!(
            "run {id} {state}{}",
            run["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    Ok(match (state, code) {
        ("succeeded", _) => 0,
        (_, Some(c)) if c != 0 => i32::try_from(c).unwrap_or(1),
        _ => 1,
    })
}

async fn json_of(r: reqwest::Response) -> anyhow::Result<Value> {
    let bytes = r.bytes().await?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn problem_text(status: u16, v: &Value) -> String {
    match v["detail"].as_str() {
        Some(d) => format!("{status}: {d}"),
        None => format!("{status}: {v}"),
    }
}

/// Read the run's event stream from after `last` until it ends (`Ok(true)`:
/// the `end` event came) or breaks.
async fn follow(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
    last: &mut Option<i64>,
    printer: &mut Printer,
) -> anyhow::Result<bool> {
    let mut req = client
        .get(format!("{base}/api/v1/runs/{id}/events"))
        .bearer_auth(token)
        .header("accept", "text/event-stream");
    if let Some(l) = last {
        req = req.header("last-event-id", l.to_string());
    }
    let mut r = req.send().await.context("opening the event stream")?;
    if !r.status().is_success() {
        let status = r.status().as_u16();
        let v = json_of(r).await.unwrap_or(Value::Null);
        bail!("{}", problem_text(status, &v));
    }
    let mut buf: Vec<u8> = Vec::new();
    let (mut event, mut data, mut ev_id) = (String::new(), String::new(), None::<i64>);
    while let Some(chunk) = r.chunk().await.context("reading the event stream")? {
        buf.extend_from_slice(&chunk);
        while let Some(n) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=n).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if event == "end" {
                    return Ok(true);
                }
                if !data.is_empty() {
                    if let Ok(v) = serde_json::from_str::<Value>(&data) {
                        printer.event(&v);
                    }
                    if ev_id.is_some() {
                        *last = ev_id;
                    }
                }
                event.clear();
                data.clear();
                ev_id = None;
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            } else if let Some(v) = line.strip_prefix("id:") {
                ev_id = v.trim().parse().ok();
            }
        }
    }
    Ok(false)
}

/// Prints events: their text, or as JSON lines.
struct Printer {
    json: bool,
    /// Text printed for this run so far (a final `result` repeating the
    /// answer is then not printed again).
    printed: bool,
    /// The last output ended without a newline.
    open_line: bool,
    /// Events seen since the last look (reconnect progress).
    seen: usize,
}

impl Printer {
    fn new(json: bool) -> Self {
        Printer {
            json,
            printed: false,
            open_line: false,
            seen: 0,
        }
    }

    fn event(&mut self, v: &Value) {
        self.seen += 1;
        let mut out = std::io::stdout().lock();
        if self.json {
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
            return;
        }
        if v["source"] != "output" {
            return;
        }
        let kind = v["type"].as_str().unwrap_or("");
        if kind == "raw" {
            let _ = writeln!(out, "{}", v["raw"].as_str().unwrap_or(""));
            self.open_line = false;
            self.printed = true;
        } else if let Some(text) = text_of(&v["data"]) {
            if kind == "result" && self.printed {
                return;
            }
            if kind.contains("delta") {
                let _ = write!(out, "{text}");
                self.open_line = !text.ends_with('\n');
            } else {
                if self.open_line {
                    let _ = writeln!(out);
                }
                let _ = writeln!(out, "{text}");
                self.open_line = false;
            }
            self.printed = true;
        }
        let _ = out.flush();
    }

    fn finish(&mut self) {
        if self.open_line {
            println!();
            self.open_line = false;
        }
    }
}

/// The text an event carries, in the shapes the providers' streams use:
/// `text`, `result` or `content` as a string (the test CLI, Claude Code's
/// result, Gemini CLI), `message.content[].text` (Claude Code's assistant
/// messages), `item.text` (Codex).
fn text_of(d: &Value) -> Option<String> {
    for k in ["text", "result", "content"] {
        if let Some(s) = d[k].as_str() {
            return Some(s.to_string());
        }
    }
    if let Some(parts) = d["message"]["content"].as_array() {
        let t: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        if !t.is_empty() {
            return Some(t.join(""));
        }
    }
    d["item"]["text"].as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_comes_from_each_providers_shape() {
        assert_eq!(
            text_of(&json!({"type":"delta","text":"a"})).as_deref(),
            Some("a")
        );
        assert_eq!(
            text_of(
                &json!({"type":"assistant","message":{"content":[{"type":"text","text":"hi"}]}})
            )
            .as_deref(),
            Some("hi")
        );
        assert_eq!(
            text_of(&json!({"type":"item.completed","item":{"type":"agent_message","text":"ok"}}))
                .as_deref(),
            Some("ok")
        );
        assert_eq!(text_of(&json!({"type":"start","prompt":"p"})), None);
    }
}
