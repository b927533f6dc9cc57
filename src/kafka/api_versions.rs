//! ApiVersions: the versions this broker serves (see [`super::SUPPORTED`]).
//!
//! Tagged fields at their default values are omitted (the codec does so), which old librdkafka
//! (kcat 1.7.1 links 2.0.2) needs: it mis-skips tagged fields it does not know.

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::{ApiVersion, ApiVersionsResponse};

use super::{code, encode_response, SUPPORTED};

fn body(error_code: i16) -> ApiVersionsResponse {
    let mut r = ApiVersionsResponse::default();
    r.error_code = error_code;
    r.api_keys = SUPPORTED
        .iter()
        .map(|(k, lo, hi)| {
            let mut v = ApiVersion::default();
            v.api_key = *k as i16;
            v.min_version = super::advertised_min(*k, *lo);
            v.max_version = *hi;
            v
        })
        .collect();
    r
}

/// The normal response at the client's version.
pub fn response(correlation_id: i32, version: i16) -> anyhow::Result<Bytes> {
    encode_response(correlation_id, version, &body(code::NONE))
}

/// A v0 response with UNSUPPORTED_VERSION, for a client that asked with a newer version.
pub fn unsupported(correlation_id: i32) -> anyhow::Result<Bytes> {
    encode_response(correlation_id, 0, &body(code::UNSUPPORTED_VERSION))
}
