//! The routes and their OpenAPI document, from one list: a handler is
//! routed exactly when it is documented. Every operation also documents
//! the problem answers (`4XX`/`5XX` → `Problem`) and the rate-limit and
//! request-id headers.

use std::sync::OnceLock;

use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{self, RefOr};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::routes::{admin, auth, ops, runs, sessions, streams, vms};
use super::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Polydev Remote controller API",
        description = "Connect Claude Code, Codex and Gemini CLI with your own accounts through an isolated browser desktop, then use them remotely. Authenticate with `Authorization: Bearer <API token | JWT>` or the dashboard's `polydev_session` cookie. Errors are RFC 7807 problems (`application/problem+json`) carrying the request id.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&Security),
    security(("bearer" = []), ("cookie" = [])),
    components(schemas(super::model::ProblemDoc)),
    tags(
        (name = "auth", description = "Logging in and out, the caller"),
        (name = "tokens", description = "The caller's API tokens"),
        (name = "sessions", description = "Connect-provider sessions"),
        (name = "vms", description = "The caller's VMs"),
        (name = "runs", description = "Prompts run by a provider's CLI in the caller's CLI VM"),
        (name = "credentials", description = "Stored credentials (metadata only)"),
        (name = "streams", description = "Desktop and terminal stream tickets"),
        (name = "admin", description = "Accounts, upstream ports, every VM and session (admin)"),
        (name = "ops", description = "Health, readiness, metrics, this document"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`pdt_…`) or a JWT from the configured identity provider",
                    ))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::auth::SESSION_COOKIE,
            ))),
        );
    }
}

/// Add the problem answers and the common headers to every operation.
fn add_common_responses(doc: &mut openapi::OpenApi) {
    use openapi::content::ContentBuilder;
    use openapi::header::HeaderBuilder;
    use openapi::response::ResponseBuilder;
    use openapi::schema::{ObjectBuilder, Type};

    let int_header = |d: &str| -> RefOr<openapi::Header> {
        HeaderBuilder::new()
            .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
            .description(Some(d))
            .build()
            .into()
    };
    let str_header = |d: &str| -> RefOr<openapi::Header> {
        HeaderBuilder::new()
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .description(Some(d))
            .build()
            .into()
    };
    let problem = |d: &str| -> RefOr<openapi::Response> {
        let r = ResponseBuilder::new()
            .description(d)
            .content(
                super::error::PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(RefOr::Ref(openapi::Ref::from_schema_name("Problem"))))
                    .build(),
            )
            .build();
        let mut r = r;
        r.headers
            .insert("x-request-id".into(), str_header("The request id"));
        r.into()
    };
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            for (_, r) in op.responses.responses.iter_mut() {
                if let RefOr::T(r) = r {
                    r.headers
                        .insert("x-request-id".into(), str_header("The request id"));
                    r.headers.insert(
                        "ratelimit-limit".into(),
                        int_header("Requests allowed at once (bucket size)"),
                    );
                    r.headers.insert(
                        "ratelimit-remaining".into(),
                        int_header("Requests left now"),
                    );
                    r.headers.insert(
                        "ratelimit-reset".into(),
                        int_header("Seconds until the bucket is full again"),
                    );
                }
            }
            op.responses.responses.insert(
                "4XX".into(),
                problem("The request was refused; `detail` says why and what to do"),
            );
            op.responses.responses.insert(
                "5XX".into(),
                problem("The controller failed or is unavailable"),
            );
        }
    }
}

/// The routes and the document describing exactly them.
pub fn router_and_document() -> (Router<AppState>, openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
        .routes(routes!(auth::login))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::link_post, auth::link_get))
        .routes(routes!(auth::me))
        .routes(routes!(auth::password))
        .routes(routes!(auth::list_tokens, auth::create_token))
        .routes(routes!(auth::revoke_token))
        .routes(routes!(sessions::providers))
        .routes(routes!(sessions::create, sessions::list))
        .routes(routes!(sessions::get))
        .routes(routes!(sessions::cancel))
        .routes(routes!(sessions::input))
        .routes(routes!(sessions::events))
        .routes(routes!(vms::list, vms::create))
        .routes(routes!(vms::get, vms::destroy))
        .routes(routes!(vms::stop))
        .routes(routes!(vms::start))
        .routes(routes!(vms::credentials))
        .routes(routes!(vms::delete_credential))
        .routes(routes!(vms::ticket))
        .routes(routes!(runs::create, runs::list))
        .routes(routes!(runs::get, runs::cancel))
        .routes(routes!(runs::events))
        .routes(routes!(streams::desktop))
        .routes(routes!(streams::terminal))
        .routes(routes!(admin::users, admin::create_user))
        .routes(routes!(admin::login_link))
        .routes(routes!(admin::upstreams))
        .routes(routes!(admin::pin, admin::release))
        .routes(routes!(admin::rotate))
        .routes(routes!(admin::vms))
        .routes(routes!(admin::vm_log))
        .routes(routes!(admin::session_summary))
        .split_for_parts();
    add_common_responses(&mut doc);
    (router, doc)
}

/// The document as JSON (built once).
pub fn json() -> &'static serde_json::Value {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let (_, doc) = router_and_document();
        serde_json::to_value(&doc).unwrap_or_default()
    })
}

/// The document, pretty-printed with a trailing newline (the form checked
/// in as `docs/openapi.json`).
pub fn pretty() -> String {
    let mut s = serde_json::to_string_pretty(json()).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    /// `docs/openapi.json` is the document the code serves; regenerate it
    /// with `POLYDEV_UPDATE_OPENAPI=1 cargo test -p polydev-controller openapi`.
    #[test]
    fn the_checked_in_document_is_the_served_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let now = super::pretty();
        if std::env::var_os("POLYDEV_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &now).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == now,
            "docs/openapi.json differs from the document the API serves: regenerate it with \
             POLYDEV_UPDATE_OPENAPI=1 cargo test -p polydev-controller openapi, and review the diff"
        );
    }

    #[test]
    fn every_operation_documents_problems_and_has_an_id() {
        let doc = super::json();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 20, "{}", paths.len());
        // Unique, as OpenAPI requires (clients and test tools key on them).
        let mut ids = std::collections::HashSet::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                assert!(op["operationId"].is_string(), "{method} {path}");
                assert!(
                    ids.insert(op["operationId"].to_string()),
                    "{method} {path}: operationId {} is used twice",
                    op["operationId"]
                );
                assert!(op["responses"]["4XX"].is_object(), "{method} {path}");
            }
        }
    }
}
