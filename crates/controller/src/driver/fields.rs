//! Captured files are data, not configuration: of a JSON credential file
//! only the fields its provider names (`[[capture]] deliver_keys`) are
//! sealed and delivered, and delivery merges them into the file the CLI VM
//! already has. Whatever else the throwaway browser VM's file held (a
//! `.claude.json` can carry `mcpServers` entries that run commands) never
//! reaches the long-lived CLI VM, and the CLI VM's own settings survive.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::providers::Provider;

/// Why a file's fields could not be taken or merged. Messages never echo
/// file content: it is a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldsError {
    /// The captured file is not a JSON object.
    #[error("the captured ~/{0} is not a JSON object")]
    CapturedNotObject(String),
    /// The CLI VM's own file is not a JSON object: merging into it would
    /// destroy it.
    #[error(
        "the CLI VM's ~/{0} is not a JSON object, so the credential cannot be merged into it; \
         fix or remove that file in the CLI VM and connect again"
    )]
    ExistingNotObject(String),
    /// The CLI VM's own file is not a JSON object: the credential's fields
    /// cannot be taken out of it without destroying it.
    #[error(
        "the CLI VM's ~/{0} is not a JSON object, so the credential's fields cannot be removed \
         from it; fix or remove that file in the CLI VM and disconnect again"
    )]
    StripNotObject(String),
}

/// The named fields (dotted keys, e.g. `tokens` or `a.b`) of the JSON
/// object `data`, as a JSON object of the same shape; absent keys are left
/// out.
pub fn select(path: &str, data: &[u8], keys: &[String]) -> Result<Vec<u8>, FieldsError> {
    let Ok(Value::Object(src)) = serde_json::from_slice::<Value>(data) else {
        return Err(FieldsError::CapturedNotObject(path.to_string()));
    };
    let mut out = Map::new();
    copy_fields(&src, &mut out, keys);
    Ok(serde_json::to_vec(&Value::Object(out)).unwrap_or_default())
}

/// The captured files with each reduced to its credential fields (files
/// without `deliver_keys` whole): what is sealed.
pub fn credential_only(
    p: &Provider,
    files: BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, Vec<u8>>, FieldsError> {
    files
        .into_iter()
        .map(
            |(path, data)| match p.capture.iter().find(|f| f.path == path) {
                Some(f) if !f.deliver_keys.is_empty() => {
                    let only = select(&path, &data, &f.deliver_keys)?;
                    Ok((path, only))
                }
                _ => Ok((path, data)),
            },
        )
        .collect()
}

/// `existing` (the CLI VM's file; `None`: there is none) with the named
/// fields of `sealed` set, everything else of `existing` kept.
pub fn merge(
    path: &str,
    existing: Option<&[u8]>,
    sealed: &[u8],
    keys: &[String],
) -> Result<Vec<u8>, FieldsError> {
    let Ok(Value::Object(src)) = serde_json::from_slice::<Value>(sealed) else {
        return Err(FieldsError::CapturedNotObject(path.to_string()));
    };
    let mut dst = match existing {
        None => Map::new(),
        Some(b) if b.iter().all(u8::is_ascii_whitespace) => Map::new(),
        Some(b) => match serde_json::from_slice::<Value>(b) {
            Ok(Value::Object(m)) => m,
            _ => return Err(FieldsError::ExistingNotObject(path.to_string())),
        },
    };
    copy_fields(&src, &mut dst, keys);
    // Pretty, as the CLIs write their own files.
    Ok(serde_json::to_vec_pretty(&Value::Object(dst)).unwrap_or_default())
}

/// `existing` (the CLI VM's file) without the named fields (dotted keys),
/// everything else kept: what a disconnect leaves of a file whose
/// credential was merged in. `None` when none of the fields was there (the
/// file need not be written).
pub fn strip(path: &str, existing: &[u8], keys: &[String]) -> Result<Option<Vec<u8>>, FieldsError> {
    let mut dst = match serde_json::from_slice::<Value>(existing) {
        Ok(Value::Object(m)) => m,
        _ if existing.iter().all(u8::is_ascii_whitespace) => return Ok(None),
        _ => return Err(FieldsError::StripNotObject(path.to_string())),
    };
    let mut removed = false;
    for key in keys {
        let parts: Vec<&str> = key.split('.').collect();
        removed |= remove(&mut dst, &parts);
    }
    // Pretty, as the CLIs write their own files.
    Ok(removed.then(|| serde_json::to_vec_pretty(&Value::Object(dst)).unwrap_or_default()))
}

fn remove(m: &mut Map<String, Value>, parts: &[&str]) -> bool {
    let Some((last, parents)) = parts.split_last() else {
        return false;
    };
    let mut cur = m;
    for p in parents {
        match cur.get_mut(*p) {
            Some(Value::Object(next)) => cur = next,
            _ => return false,
        }
    }
    cur.remove(*last).is_some()
}

fn copy_fields(src: &Map<String, Value>, dst: &mut Map<String, Value>, keys: &[String]) {
    for key in keys {
        let parts: Vec<&str> = key.split('.').collect();
        let Some(value) = get(src, &parts) else {
            continue;
        };
        set(dst, &parts, value.clone());
    }
}

fn get<'a>(m: &'a Map<String, Value>, parts: &[&str]) -> Option<&'a Value> {
    let (last, parents) = parts.split_last()?;
    parents
        .iter()
        .try_fold(m, |m, p| m.get(*p)?.as_object())?
        .get(*last)
}

fn set(m: &mut Map<String, Value>, parts: &[&str], value: Value) {
    let Some((last, parents)) = parts.split_last() else {
        return;
    };
    let mut cur = m;
    for p in parents {
        let slot = cur
            .entry((*p).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else { return };
        cur = next;
    }
    cur.insert((*last).to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_named_fields_are_taken() {
        let captured = br#"{"oauthAccount":{"email":"a@b"},"mcpServers":{"x":{"command":"sh"}},"theme":"light"}"#;
        let got = select(".claude.json", captured, &keys(&["oauthAccount", "absent"])).unwrap();
        let v: Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(v, serde_json::json!({"oauthAccount":{"email":"a@b"}}));
        // Nested keys keep their shape.
        let got = select("f", br#"{"a":{"b":1,"c":2},"d":3}"#, &keys(&["a.b"])).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&got).unwrap(),
            serde_json::json!({"a":{"b":1}})
        );
        assert_eq!(
            select("f", b"[1]", &keys(&["a"])),
            Err(FieldsError::CapturedNotObject("f".into()))
        );
    }

    #[test]
    fn strip_takes_out_only_the_named_fields() {
        let holder = br#"{"theme":"dark","oauthAccount":{"email":"a@b"},"a":{"b":1,"c":2}}"#;
        let got = strip(
            ".claude.json",
            holder,
            &keys(&["oauthAccount", "a.b", "absent", "x.y"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&got).unwrap(),
            serde_json::json!({"theme":"dark","a":{"c":2}})
        );
        // What merge put in, strip takes out; the holder's settings stay.
        let merged = merge("f", Some(br#"{"own":1}"#), br#"{"t":"x"}"#, &keys(&["t"])).unwrap();
        let got = strip("f", &merged, &keys(&["t"])).unwrap().unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&got).unwrap(),
            serde_json::json!({"own":1})
        );
        // Nothing to take out: no write needed.
        assert_eq!(
            strip("f", br#"{"own":1}"#, &keys(&["t", "own.x"])),
            Ok(None)
        );
        assert_eq!(strip("f", b" \n", &keys(&["t"])), Ok(None));
        // A holder's file that is not an object is not destroyed.
        assert_eq!(
            strip("f", b"[1]", &keys(&["t"])),
            Err(FieldsError::StripNotObject("f".into()))
        );
    }

    #[test]
    fn merge_keeps_the_holders_settings() {
        let existing = br#"{"theme":"dark","mcpServers":{},"oauthAccount":{"email":"old"}}"#;
        let sealed = br#"{"oauthAccount":{"email":"new"},"mcpServers":{"evil":{"command":"sh"}}}"#;
        let got = merge(
            ".claude.json",
            Some(existing),
            sealed,
            &keys(&["oauthAccount"]),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&got).unwrap(),
            serde_json::json!({"theme":"dark","mcpServers":{},"oauthAccount":{"email":"new"}})
        );
        // No file yet, or an empty one: just the fields.
        for e in [None, Some(&b" \n"[..])] {
            let got = merge("f", e, br#"{"t":"x","u":1}"#, &keys(&["t"])).unwrap();
            assert_eq!(
                serde_json::from_slice::<Value>(&got).unwrap(),
                serde_json::json!({"t":"x"})
            );
        }
        // A holder's file that is not an object is not destroyed.
        assert_eq!(
            merge("f", Some(b"not json"), br#"{"t":1}"#, &keys(&["t"])),
            Err(FieldsError::ExistingNotObject("f".into()))
        );
        // A nested key replaces a non-object parent.
        let got = merge(
            "f",
            Some(br#"{"a":5}"#),
            br#"{"a":{"b":1}}"#,
            &keys(&["a.b"]),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&got).unwrap(),
            serde_json::json!({"a":{"b":1}})
        );
    }
}
