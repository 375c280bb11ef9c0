//! Which edge reports the ledger holds already.
//!
//! The filter keeps each report until the ledger took it and sends a batch again
//! when no answer came (`filter-wasm/src/report.rs`): a batch written whose answer
//! was lost (a timeout, the sidecar killed between its `fdatasync` and its answer)
//! comes again. Each report carries an id, and each edge row notes it
//! (`args_json` `{"report_id": …, "edge_ts_ms": …}`); [`RecentReports`] holds the
//! ids of the reports recorded (or summed) last, and those being written now. At
//! start it is rebuilt from the edge rows of the journal's retained records — the
//! rows written in the seconds before a crash are among them (the journal's
//! horizon lags 10 s), so a batch sent again after a restart is known — but not
//! from reports summed beyond the ledger's budget, which have no row of their own
//! (one sent again after a restart is summed again). So a report sent twice makes
//! one row, as long as fewer than [`RECENT_REPORTS`] others were recorded in
//! between (a batch comes back within its timeout and the filter's backoff,
//! seconds): beyond, the second row carries the same `report_id`.

use std::collections::{HashSet, VecDeque};

use gw_core::ledger::{LedgerRow, Stage};

use crate::journal::{Entry, Lsn, Txn};

/// Report ids remembered (about 6 MiB).
pub const RECENT_REPORTS: usize = 65_536;

/// The ids of the edge reports recorded last, at most [`RECENT_REPORTS`] (the
/// oldest leave first), and of those being written now.
#[derive(Debug, Default)]
pub struct RecentReports {
    ids: HashSet<Box<str>>,
    order: VecDeque<Box<str>>,
    /// Being written by a batch not yet durable.
    pending: HashSet<Box<str>>,
}

/// Where a report id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not known: to be recorded.
    New,
    /// Recorded (or summed) already.
    Recorded,
    /// A batch being written holds it now: whether it will be recorded is not
    /// known yet.
    Pending,
}

impl RecentReports {
    /// The ids of the edge rows in `records` (the journal's retained records, in
    /// order).
    pub fn recovered(records: &[(Lsn, Txn)]) -> RecentReports {
        let mut r = RecentReports::default();
        for (_, txn) in records {
            for e in &txn.entries {
                if let Entry::Row(row) = e {
                    if let Some(id) = report_id(row) {
                        r.insert(&id);
                    }
                }
            }
        }
        r
    }

    /// Where `id` stands.
    pub fn seen(&self, id: &str) -> Seen {
        if self.ids.contains(id) {
            Seen::Recorded
        } else if self.pending.contains(id) {
            Seen::Pending
        } else {
            Seen::New
        }
    }

    /// Marks `ids` as being written (each must be [`Seen::New`]).
    pub fn begin(&mut self, ids: &[&str]) {
        self.pending
            .extend(ids.iter().map(|&id| Box::<str>::from(id)));
    }

    /// The batch holding `ids` ended: recorded (`true`) or not written at all.
    pub fn end(&mut self, ids: &[&str], recorded: bool) {
        for id in ids {
            self.pending.remove(*id);
            if recorded {
                self.insert(id);
            }
        }
    }

    /// Notes that the report `id` was recorded.
    pub fn insert(&mut self, id: &str) {
        if self.ids.contains(id) {
            return;
        }
        if self.order.len() == RECENT_REPORTS {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        let id: Box<str> = id.into();
        self.ids.insert(id.clone());
        self.order.push_back(id);
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The report id an edge row notes, if any: only a refusal's (what the edge
/// reports). An edge row accepting a command keeps the command's arguments in
/// the same column, and a command may carry an argument named `report_id`: a
/// real report's id taken from there would have its refusal dropped as
/// recorded.
pub fn report_id(row: &LedgerRow) -> Option<String> {
    if row.stage != Stage::Edge.as_str()
        || row.decision != gw_core::ledger::Decision::Rejected.as_str()
        || !row.args_json.contains("report_id")
    {
        return None;
    }
    let note: serde_json::Value = serde_json::from_str(&row.args_json).ok()?;
    Some(note.get("report_id")?.as_str()?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge_row(note: &str) -> LedgerRow {
        LedgerRow {
            stage: Stage::Edge.as_str().into(),
            decision: gw_core::ledger::Decision::Rejected.as_str().into(),
            args_json: note.into(),
            ..LedgerRow::default()
        }
    }

    #[test]
    fn ids_come_back_from_the_journals_edge_rows() {
        let mut sidecar = edge_row(r#"{"report_id": "a-1"}"#);
        sidecar.stage = Stage::Sidecar.as_str().into();
        // An edge row accepting a command whose arguments name a report id.
        let mut accepted = edge_row(r#"{"report_id": "c-3"}"#);
        accepted.decision = gw_core::ledger::Decision::Accepted.as_str().into();
        let records = vec![
            (
                1,
                Txn::of(vec![
                    Entry::row(edge_row(r#"{"report_id": "a-1", "edge_ts_ms": 5}"#)),
                    Entry::row(edge_row(r#"{"unrecorded": 3}"#)),
                    Entry::row(edge_row("")),
                ]),
            ),
            (2, Txn::of(vec![Entry::row(sidecar), Entry::row(accepted)])),
            (
                3,
                Txn::of(vec![Entry::row(edge_row(
                    r#"{"raw_bytes": 9, "raw_kept": 2, "report_id": "b-2"}"#,
                ))]),
            ),
        ];
        let r = RecentReports::recovered(&records);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r.seen("a-1"), r.seen("b-2"), r.seen("c-3")),
            (Seen::Recorded, Seen::Recorded, Seen::New)
        );
    }

    #[test]
    fn the_oldest_leave_first() {
        let mut r = RecentReports::default();
        for i in 0..=RECENT_REPORTS {
            r.insert(&format!("x-{i}"));
        }
        r.insert("x-5");
        assert_eq!(r.len(), RECENT_REPORTS);
        r.begin(&["p-1", "p-2"]);
        assert_eq!(
            (r.seen("p-1"), r.seen("x-1"), r.seen("n-1")),
            (Seen::Pending, Seen::Recorded, Seen::New)
        );
        assert_eq!(
            (
                r.seen("x-0"),
                r.seen("x-1"),
                r.seen(&format!("x-{RECENT_REPORTS}"))
            ),
            (Seen::New, Seen::Recorded, Seen::Recorded)
        );
        r.end(&["p-1"], true);
        r.end(&["p-2"], false);
        assert_eq!((r.seen("p-1"), r.seen("p-2")), (Seen::Recorded, Seen::New));
        assert_eq!(r.seen("x-1"), Seen::New, "the oldest made room");
    }
}
