//! InitProducerId: producer ids for idempotent producers. With a transactional id the request
//! goes to the transaction coordinator instead ([`super::txn::init_producer_id`]).

use kafka_protocol::messages::init_producer_id_request::InitProducerIdRequest;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::ProducerId;

use super::code;
use crate::broker::Broker;

pub fn handle(broker: &Broker, req: InitProducerIdRequest) -> InitProducerIdResponse {
    let mut resp = InitProducerIdResponse::default();
    resp.producer_id = ProducerId(-1);
    resp.producer_epoch = -1;
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
