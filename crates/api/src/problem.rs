//! RFC 7807 problem details, the error body of every HTTP API we serve.

use serde::{Deserialize, Serialize};

/// An RFC 7807 `application/problem+json` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// A URI reference naming the problem type (`about:blank` when generic).
    #[serde(rename = "type")]
    pub type_: String,
    /// Short, human-readable summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What happened in this occurrence and what to do about it.
    pub detail: String,
    /// The request path or resource this problem concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The request id of this occurrence (also in the `X-Request-Id` response
    /// header): quote it when reporting a problem, it finds the log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl Problem {
    /// A problem with a type slug under `https://polydev.dev/problems/`.
    pub fn new(status: u16, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Problem {
            type_: format!("https://polydev.dev/problems/{slug}"),
            title: title.to_string(),
            status,
            detail: detail.into(),
            instance: None,
            request_id: None,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.title, self.status, self.detail)
    }
}
