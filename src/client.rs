//! A small Kafka client for Ferry's own commands (`ferry groups`, and later `ferry produce`,
//! `consume`, `topics`, `status`): one connection, one request at a time, codecs from the
//! `kafka-protocol` crate. Not a general-purpose client: users keep their own.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{api:?}: {source}")]
    Io {
        api: ApiKey,
        #[source]
        source: std::io::Error,
    },
    #[error("{api:?}: {message}")]
    Codec { api: ApiKey, message: String },
    #[error("{api:?}: no answer within {0:?}", .timeout)]
    Timeout { api: ApiKey, timeout: Duration },
    #[error("{0}")]
    Kafka(String),
}

/// One connection to a broker.
pub struct Client {
    stream: TcpStream,
    correlation: i32,
    client_id: String,
    pub timeout: Duration,
}

/// Responses larger than this are refused.
const RESPONSE_BYTES_MAX: usize = 256 << 20;

impl Client {
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })?
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        Ok(Client {
            stream,
            correlation: 0,
            client_id: "ferry-cli".into(),
            timeout: Duration::from_secs(30),
        })
    }

    /// Send `req` at `version` and wait for its response.
    pub async fn send<R: Request>(
        &mut self,
        req: &R,
        version: i16,
    ) -> Result<R::Response, ClientError> {
        let api = ApiKey::try_from(R::KEY).expect("a known request");
        self.correlation += 1;
        let cid = self.correlation;
        let codec = |message: String| ClientError::Codec { api, message };
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(cid)
            .with_client_id(Some(StrBytes::from_string(self.client_id.clone())));
        header
            .encode(&mut buf, R::header_version(version))
            .map_err(|e| codec(e.to_string()))?;
        req.encode(&mut buf, version)
            .map_err(|e| codec(e.to_string()))?;
        let len = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        let io = |source| ClientError::Io { api, source };
        let timeout = self.timeout;
        let fut = async {
            self.stream.write_all(&buf).await.map_err(io)?;
            let n = self.stream.read_i32().await.map_err(io)?;
            if n < 4 || n as usize > RESPONSE_BYTES_MAX {
                return Err(codec(format!("response of {n} bytes")));
            }
            let mut body = vec![0u8; n as usize];
            self.stream.read_exact(&mut body).await.map_err(io)?;
            Ok(Bytes::from(body))
        };
        let mut body = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout { api, timeout })??;
        let h = ResponseHeader::decode(
            &mut body,
            <R::Response as HeaderVersion>::header_version(version),
        )
        .map_err(|e| codec(e.to_string()))?;
        if h.correlation_id != cid {
            return Err(codec(format!(
                "correlation id {} for request {cid}",
                h.correlation_id
            )));
        }
        let resp = R::Response::decode(&mut body, version).map_err(|e| codec(e.to_string()))?;
        if body.has_remaining() {
            tracing::debug!(?api, left = body.remaining(), "response had trailing bytes");
        }
        Ok(resp)
    }
}

/// Kafka error code names for messages.
pub fn error_name(code: i16) -> &'static str {
    match code {
        0 => "NONE",
        1 => "OFFSET_OUT_OF_RANGE",
        2 => "CORRUPT_MESSAGE",
        3 => "UNKNOWN_TOPIC_OR_PARTITION",
        15 => "COORDINATOR_NOT_AVAILABLE",
        22 => "ILLEGAL_GENERATION",
        25 => "UNKNOWN_MEMBER_ID",
        27 => "REBALANCE_IN_PROGRESS",
        36 => "TOPIC_ALREADY_EXISTS",
        68 => "NON_EMPTY_GROUP",
        69 => "GROUP_ID_NOT_FOUND",
        _ => "KAFKA_ERROR",
    }
}
