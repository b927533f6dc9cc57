//! InitProducerId: producer ids for idempotent producers. Transactions are not supported, so a
//! transactional id is refused.

use kafka_protocol::messages::init_producer_id_request::InitProducerIdRequest;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::ProducerId;

use super::code;
use crate::broker::Broker;

pub fn handle(broker: &Broker, req: InitProducerIdRequest) -> InitProducerIdResponse {
    let mut resp = InitProducerIdResponse::default();
    resp.producer_id = ProducerId(-1);
    resp.producer_epoch = -1;
    if req.transactional_id.is_some() {
        resp.error_code = code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
        tracing::debug!(
            transactional_id = req.transactional_id.as_deref().map(|s| s.as_str()),
            "{}",
            super::coordinator::NO_TRANSACTIONS
        );
        return resp;
    }
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        // KIP-360: an idempotent producer bumps its own epoch after a sequence error.
        resp.producer_id = req.producer_id;
        resp.producer_epoch = req.producer_epoch + 1;
        return resp;
    }
    match broker.allocate_producer_id() {
        Ok(id) => {
            resp.producer_id = ProducerId(id);
            resp.producer_epoch = 0;
        }
        Err(e) => {
            tracing::error!(error = %e, "could not allocate a producer id");
            resp.error_code = code::UNKNOWN_SERVER_ERROR;
        }
    }
    resp
}
