//! The data plane's Prometheus metrics, read at scrape time from the counters the
//! sender, its routes, the strategy and the send audit keep on their hot paths.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::plane::DataPlane;
use super::strategy::Skip;

/// Collects `gw_sender_*`, `gw_strategy_*` and `gw_sidecar_send_audit_total`.
#[derive(Debug)]
pub struct SenderCollector(pub Arc<DataPlane>);

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataPlane")
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One counter family: `name_total{label=value...}` for each row.
fn counters<const N: usize>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[([(&str, &str); N], u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        let labels: Vec<(&str, &str)> = labels.to_vec();
        ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge: `name` at `v`.
fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for SenderCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let dp = &self.0;
        let s = &dp.sender;
        counters(
            &mut enc,
            "gw_sender_sends",
            "Sends by outcome and the route that took them",
            &[
                (
                    [("outcome", "landed"), ("route", "tpu")],
                    load(&s.stats.landed_by[0]),
                ),
                (
                    [("outcome", "landed"), ("route", "relay")],
                    load(&s.stats.landed_by[1]),
                ),
                (
                    [("outcome", "failed"), ("route", "")],
                    load(&s.stats.failed),
                ),
            ],
        )?;
        let hedged = ConstCounter::new(load(&s.stats.hedged));
        hedged.encode(enc.encode_descriptor(
            "gw_sender_hedged",
            "Sends that also went out on the second route",
            None,
            hedged.metric_type(),
        )?)?;
        let refused = ConstCounter::new(load(&s.stats.leaders_refused));
        refused.encode(enc.encode_descriptor(
            "gw_sender_leaders_refused",
            "Upcoming leaders a send passed over because of leader_allow / leader_deny",
            None,
            refused.metric_type(),
        )?)?;
        if let Some(t) = s.tpu() {
            let st = &t.stats;
            counters(
                &mut enc,
                "gw_sender_tpu",
                "TPU route events",
                &[
                    ([("event", "delivered")], load(&st.delivered)),
                    ([("event", "failed")], load(&st.failed)),
                    ([("event", "unreachable")], load(&st.unreachable)),
                    ([("event", "dropped_queue_full")], load(&st.dropped_full)),
                    ([("event", "too_large")], load(&st.too_large)),
                    ([("event", "batch_too_large")], load(&st.batch_too_large)),
                    ([("event", "connects")], load(&st.connects)),
                    ([("event", "connect_failures")], load(&st.connect_failures)),
                    (
                        [("event", "handshakes_refused")],
                        load(&st.handshakes_refused),
                    ),
                    (
                        [("event", "handshakes_capped")],
                        load(&st.handshakes_capped),
                    ),
                ],
            )?;
            let closes: Vec<_> = super::tpu::CLOSE_REASONS
                .iter()
                .zip(&st.closes)
                .map(|(r, c)| ([("reason", *r)], load(c)))
                .collect();
            counters(
                &mut enc,
                "gw_sender_tpu_closes",
                "TPU connections closed, by reason (Agave's close codes by name, then QUIC's)",
                &closes,
            )?;
        }
        if let Some(r) = s.relay() {
            counters(
                &mut enc,
                "gw_sender_relay",
                "Relay route events",
                &[
                    ([("event", "accepted")], load(&r.stats.accepted)),
                    ([("event", "failed")], load(&r.stats.failed)),
                ],
            )?;
        }
        if let Some(l) = &dp.landing {
            let st = &l.stats;
            counters(
                &mut enc,
                "gw_sender_rpc_landing",
                "JSON-RPC landing with an RPC node: preflight refusals, rebroadcasts, how rebroadcasting ended",
                &[
                    ([("event", "preflight_failed")], load(&st.preflight_failed)),
                    ([("event", "rebroadcast")], load(&st.rebroadcasts)),
                    ([("event", "seen")], load(&st.seen)),
                    ([("event", "expired")], load(&st.expired)),
                    ([("event", "retries_spent")], load(&st.retries_spent)),
                    ([("event", "not_tracked")], load(&st.not_tracked)),
                    ([("event", "refused")], load(&st.refused)),
                    ([("event", "status_busy")], load(&st.status_busy)),
                ],
            )?;
        }
        let gate = &dp.rpc_gate.stats;
        counters(
            &mut enc,
            "gw_sender_rpc_refused",
            "JSON-RPC sends the gate refused: the module stopped or killed, throttled, or busy (sender.rpc_max_in_flight sends running)",
            &[
                ([("reason", "module")], load(&gate.refused)),
                ([("reason", "throttled")], load(&gate.throttled)),
                ([("reason", "busy")], load(&gate.busy)),
            ],
        )?;
        counters(
            &mut enc,
            "gw_sender_rpc_coalesced",
            "JSON-RPC sends of a transaction (or bundle) another request was sending: answered as that send once it went, not sent again",
            &[([("reason", "in_flight")], load(&gate.coalesced))],
        )?;
        gauge(
            &mut enc,
            "gw_sender_rpc_in_flight",
            "JSON-RPC sends running now (at most sender.rpc_max_in_flight)",
            dp.rpc_gate.in_flight() as u64,
        )?;
        let hs = &dp.hot.stats;
        let mut rows = vec![
            ([("outcome", "sent")], load(&hs.sent)),
            ([("outcome", "ring_full")], load(&hs.ring_full)),
        ];
        rows.extend(
            Skip::ALL
                .iter()
                .map(|w| ([("outcome", w.as_str())], hs.skipped(*w))),
        );
        counters(
            &mut enc,
            "gw_strategy_opportunities",
            "Opportunities by outcome (sent, ring_full, or why skipped)",
            &rows,
        )?;
        counters(
            &mut enc,
            "gw_strategy_model_errors",
            "Opportunities the serving model failed to score (its predict returned an error; skipped as no_score)",
            &gw_core::Module::ALL.map(|m| ([("module", m.as_str())], hs.model_errors(m))),
        )?;
        // Received → send decision (µs), for each opportunity sent; the last
        // bucket (u64::MAX) holds the longer ones.
        let buckets = hs.decision_buckets();
        let counts: Vec<u64> = buckets.iter().map(|(_, n)| *n).collect();
        let bounds: Vec<f64> = buckets
            .iter()
            .filter(|(le, _)| *le != u64::MAX)
            .map(|(le, _)| *le as f64)
            .collect();
        // The sum is estimated from the bounded buckets (their midpoints): the hot
        // path keeps counts only.
        let sum: f64 = bounds
            .iter()
            .zip(&counts)
            .map(|(le, n)| le * 0.75 * *n as f64)
            .sum();
        crate::ops::metrics::histogram(
            &mut enc,
            "gw_strategy_decision_latency_us",
            "Opportunity received (HTTP or QUIC ingest) to send decision, in µs",
            &bounds,
            &counts,
            sum,
        )?;
        if dp.hot.ingest_addr.is_some() {
            let st = &dp.hot.ingest_stats;
            counters(
                &mut enc,
                "gw_sender_ingest",
                "QUIC ingest endpoint events: connections accepted and refused, frames valid, invalid (skipped), streams stopped as malformed",
                &[
                    ([("event", "connections")], load(&st.connections)),
                    ([("event", "refused")], load(&st.refused)),
                    ([("event", "frames")], load(&st.frames)),
                    ([("event", "invalid")], load(&st.invalid)),
                    ([("event", "malformed")], load(&st.malformed)),
                ],
            )?;
            let by_identity: Vec<(String, u64)> = st
                .frames_by_identity
                .lock()
                .iter()
                .map(|(k, n)| (bs58::encode(k).into_string(), load(n)))
                .collect();
            let rows: Vec<([(&str, &str); 1], u64)> = by_identity
                .iter()
                .map(|(k, n)| ([("identity", k.as_str())], *n))
                .collect();
            counters(
                &mut enc,
                "gw_sender_ingest_frames_by_identity",
                "QUIC ingest valid frames by searcher (client identity, base58), since each first connected",
                &rows,
            )?;
        }
        if let Some(a) = &dp.audit {
            counters(
                &mut enc,
                "gw_sidecar_send_audit",
                "Send audit rows: written to ClickHouse, dropped on a full queue, failed inserts",
                &[
                    ([("event", "written")], load(&a.stats.written)),
                    ([("event", "dropped")], load(&a.stats.dropped)),
                    ([("event", "insert_errors")], load(&a.stats.insert_errors)),
                ],
            )?;
            gauge(
                &mut enc,
                "gw_sidecar_send_audit_pending_rows",
                "Send audit rows in the journal not yet in ClickHouse",
                a.pending_rows(),
            )?;
            gauge(
                &mut enc,
                "gw_sidecar_send_audit_pending_rows_on_disk",
                "Of the send audit rows not yet in ClickHouse, those waiting in the journal on disk only (beyond audit_memory_rows)",
                a.pending_rows_on_disk(),
            )?;
        }
        Ok(())
    }
}
