//! The stamp stage's context for one request: after the buffer filter, it swaps the
//! verify stage's ticket for the verified headers (see [`crate::stamp`]).

use std::rc::Rc;

use gw_core::contract::headers::TICKET;
use gw_core::{Code, Reject};

use crate::abi;
use crate::config::StampConfig;
use crate::host::{self, local_reject, Action, HostStore};
use crate::stamp::{self, TakeError};

/// The stamp stage's context for one request.
pub struct StampStage {
    config: Rc<StampConfig>,
}

impl StampStage {
    /// A context of the stamp stage.
    pub fn new(config: Rc<StampConfig>) -> StampStage {
        StampStage { config }
    }

    /// Swaps the ticket, if any, for the headers stored under it.
    pub fn on_request_headers(&self) -> Action {
        let fail = |detail: String| {
            local_reject(&Reject::with(Code::Unavailable, detail));
            Action::Pause
        };
        let ticket = match abi::request_header(TICKET) {
            Ok(Some(t)) => t,
            Ok(None) => return Action::Continue,
            Err(e) => return fail(format!("cannot read the ticket: {e:?}")),
        };
        // This VM's tickets are in its own slots; others in shared data.
        let local =
            host::with_local_slots(|l| l.take(&ticket)).unwrap_or(Some(Err(TakeError::Missing)));
        let taken = local
            .unwrap_or_else(|| stamp::take(&HostStore, &self.config.stamp_key_prefix, &ticket));
        let stamped = match taken {
            Ok(h) => h,
            Err(e) => return fail(format!("verified headers not found: {e:?}")),
        };
        if let Err(e) = abi::remove_request_header(TICKET) {
            return fail(format!("cannot remove ticket: {e:?}"));
        }
        for (k, v) in &stamped {
            if let Err(e) = abi::set_request_header(k, v) {
                return fail(format!("cannot set header: {e:?}"));
            }
        }
        Action::Continue
    }
}
