//! The refusals a route answers because of what it is (takes a JSON body, sits behind the
//! admin token, behind the machine certificate, reads the database), listed once for the
//! OpenAPI document: each route names the sets that apply to it in its `responses(…)`, after
//! which its own statuses follow (a route's own entry for a status replaces the set's).
//!
//! Every answer listed here is an [`ApiError`](license_protocol::error::ApiError) body;
//! `tests/openapi_conformance.rs` runs schemathesis against the served document to hold the
//! document to what the routes answer.

use std::collections::BTreeMap;

use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};

/// `(status, description)` rows as OpenAPI responses with an `ApiError` JSON body.
fn error_responses(rows: &[(u16, &str)]) -> BTreeMap<String, RefOr<Response>> {
    rows.iter()
        .map(|(status, description)| {
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ApiError")))
                .build();
            let response = ResponseBuilder::new()
                .description(*description)
                .content("application/json", content)
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

/// A route reading a JSON body through [`ApiJson`](super::error::ApiJson), on a listener with a
/// body limit.
#[derive(Debug)]
pub struct JsonBodyRefusals;

impl utoipa::IntoResponses for JsonBodyRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        error_responses(&[
            (400, "`invalid_request`: the body is not JSON, or a field is refused"),
            (413, "`body_too_large`: the body is larger than the listener reads"),
            (415, "`unsupported_media_type`: the body is not declared `application/json`"),
            (422, "`invalid_request`: JSON that does not fit the request's type (the message names the field)"),
        ])
    }
}

/// A route that answers from the database: its failure is a 500 (details in the server log).
#[derive(Debug)]
pub struct InternalRefusal;

impl utoipa::IntoResponses for InternalRefusal {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        error_responses(&[(
            500,
            "`internal_error`: the server failed (e.g. its database); details in its log",
        )])
    }
}

/// A `GET` of the admin API: the bearer token is checked before the route runs.
#[derive(Debug)]
pub struct AdminReadRefusals;

impl utoipa::IntoResponses for AdminReadRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut responses = error_responses(&[(
            401,
            "`unauthorized`: no `Authorization: Bearer` token, or an unknown or revoked one",
        )]);
        responses.extend(InternalRefusal::responses());
        responses
    }
}

/// Any other method of the admin API: a `readonly` token is refused too.
#[derive(Debug)]
pub struct AdminWriteRefusals;

impl utoipa::IntoResponses for AdminWriteRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut responses = AdminReadRefusals::responses();
        responses.extend(error_responses(&[(
            403,
            "`forbidden`: the token is `readonly`, which may only `GET`",
        )]));
        responses
    }
}

/// A route of the agent API: the machine certificate is checked against the database before
/// the route runs (the TLS handshake already refused a connection without one).
#[derive(Debug)]
pub struct AgentRefusals;

impl utoipa::IntoResponses for AgentRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut responses = error_responses(&[
            (
                403,
                "the certificate is refused: `machine_revoked`, `certificate_revoked`, \
             `certificate_superseded`, `certificate_expired`, `unknown_certificate` or \
             `bad_certificate_cn`",
            ),
            (
                503,
                "`server_busy`: the server is shedding load; retry after the `Retry-After` seconds",
            ),
        ]);
        responses.extend(InternalRefusal::responses());
        responses
    }
}
