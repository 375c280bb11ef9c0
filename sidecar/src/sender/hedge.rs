//! Hedged sending as a pure state machine (no I/O, no clock): the transaction sender
//! feeds it events with the time they happened and performs the actions it returns.
//!
//! One transaction: send on the preferred route; if that route fails, or has not
//! confirmed within `hedge_delay`, send on the other route — at most one hedge per
//! transaction. The first confirmation wins; both routes failing is a clear error.
//! [`RouteStats`] keep per-route attempts, failures and latency so the preferred
//! route adapts (the original "RouteManager probabilities").

use std::time::{Duration, Instant};

/// The two ways to land a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// QUIC straight to the leader's TPU.
    Tpu,
    /// The block-engine relay (JSON-RPC).
    Relay,
}

impl Route {
    /// The other route.
    pub fn other(self) -> Route {
        match self {
            Route::Tpu => Route::Relay,
            Route::Relay => Route::Tpu,
        }
    }

    /// Both routes, in [`Route::index`] order.
    pub const ALL: [Route; 2] = [Route::Tpu, Route::Relay];

    /// Position in per-route arrays (`Route::ALL[r.index()] == r`).
    pub fn index(self) -> usize {
        match self {
            Route::Tpu => 0,
            Route::Relay => 1,
        }
    }

    /// Name for logs, metrics and audit rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Tpu => "tpu",
            Route::Relay => "relay",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The transaction is ready to go.
    Start,
    /// The sender's timer fired (at or after [`Hedge::deadline`]).
    Timer,
    /// A route reported failure (connection refused, RPC error, …).
    Failed(Route),
    /// A route confirmed the transaction landed (or was accepted, per policy).
    Confirmed(Route),
}

/// What the sender must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send on this route.
    Send(Route),
    /// Finished: landed via this route.
    Landed(Route),
    /// Finished: both routes failed.
    Failed,
}

/// Where one transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started.
    Idle,
    /// Sent on the primary only.
    Primary,
    /// Sent on both routes.
    Hedged,
    /// Done (landed or failed): later events are ignored.
    Done,
}

/// One transaction's hedging.
#[derive(Debug, Clone)]
pub struct Hedge {
    primary: Route,
    delay: Duration,
    phase: Phase,
    started: Option<Instant>,
    failed: [bool; 2],
    hedged_at: Option<Instant>,
}

fn idx(r: Route) -> usize {
    r.index()
}

impl Hedge {
    /// A transaction that goes first on `primary`, hedged after `delay`.
    pub fn new(primary: Route, delay: Duration) -> Hedge {
        Hedge {
            primary,
            delay,
            phase: Phase::Idle,
            started: None,
            failed: [false; 2],
            hedged_at: None,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When the sender must deliver [`Event::Timer`], if a hedge is still pending.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.phase, self.started) {
            (Phase::Primary, Some(t)) => Some(t + self.delay),
            _ => None,
        }
    }

    /// When the hedge was sent (for the timing-error statistics), if it was.
    pub fn hedged_at(&self) -> Option<Instant> {
        self.hedged_at
    }

    /// Whether the transaction was hedged.
    pub fn hedged(&self) -> bool {
        self.hedged_at.is_some()
    }

    fn hedge(&mut self, now: Instant) -> Option<Action> {
        self.phase = Phase::Hedged;
        self.hedged_at = Some(now);
        Some(Action::Send(self.primary.other()))
    }

    /// Applies `event` at `now`; returns what to do (at most one action).
    pub fn on(&mut self, event: Event, now: Instant) -> Option<Action> {
        match (self.phase, event) {
            (Phase::Idle, Event::Start) => {
                self.phase = Phase::Primary;
                self.started = Some(now);
                Some(Action::Send(self.primary))
            }
            (Phase::Done | Phase::Idle, _) => None,
            (_, Event::Start) => None,
            (_, Event::Confirmed(r)) => {
                self.phase = Phase::Done;
                Some(Action::Landed(r))
            }
            (Phase::Primary, Event::Timer) => {
                if self.deadline().is_some_and(|d| now >= d) {
                    self.hedge(now)
                } else {
                    None // early timer: the sender re-arms at deadline()
                }
            }
            (Phase::Hedged, Event::Timer) => None,
            (phase, Event::Failed(r)) => {
                self.failed[idx(r)] = true;
                if self.failed.iter().all(|f| *f) {
                    self.phase = Phase::Done;
                    return Some(Action::Failed);
                }
                if phase == Phase::Primary && r == self.primary {
                    return self.hedge(now);
                }
                None
            }
        }
    }
}

/// Per-route statistics; the preferred route is the one with the better expected
/// time to land: EWMA latency inflated by the failure rate.
#[derive(Debug, Clone, Default)]
pub struct RouteStats {
    attempts: [u64; 2],
    failures: [u64; 2],
    ewma_us: [Option<f64>; 2],
    delivery: [Option<f64>; 2],
}

const EWMA_WEIGHT: f64 = 0.2;
/// Weight of the newest attempt in the delivery estimate (about the last 20 count).
const DELIVERY_WEIGHT: f64 = 0.1;

impl RouteStats {
    /// Records one attempt on `route`: `Ok(latency)` when it landed.
    pub fn record(&mut self, route: Route, outcome: Result<Duration, ()>) {
        let i = idx(route);
        self.attempts[i] += 1;
        let ok = if outcome.is_ok() { 1.0 } else { 0.0 };
        self.delivery[i] = Some(match self.delivery[i] {
            Some(prev) => prev + DELIVERY_WEIGHT * (ok - prev),
            None => ok,
        });
        match outcome {
            Ok(lat) => {
                let us = lat.as_secs_f64() * 1e6;
                self.ewma_us[i] = Some(match self.ewma_us[i] {
                    Some(prev) => prev + EWMA_WEIGHT * (us - prev),
                    None => us,
                });
            }
            Err(()) => self.failures[i] += 1,
        }
    }

    /// Attempts and failures of `route`.
    pub fn counts(&self, route: Route) -> (u64, u64) {
        (self.attempts[idx(route)], self.failures[idx(route)])
    }

    /// The share of recent attempts on `route` the route confirmed (for the TPU:
    /// the leader acknowledged, which is not a landing), an exponentially weighted
    /// average with the newest weighing 0.1; `None` before the first attempt.
    pub fn delivery(&self, route: Route) -> Option<f64> {
        self.delivery[idx(route)]
    }

    /// Expected microseconds to land on `route` (None until it has landed once).
    pub fn score(&self, route: Route) -> Option<f64> {
        let i = idx(route);
        let lat = self.ewma_us[i]?;
        // Laplace-smoothed success rate; a route that always fails scores badly.
        let ok = (self.attempts[i] - self.failures[i]) as f64 + 1.0;
        let rate = ok / (self.attempts[i] as f64 + 2.0);
        Some(lat / rate)
    }

    /// The route to try first; `default` until both routes have landed once.
    pub fn preferred(&self, default: Route) -> Route {
        match (self.score(Route::Tpu), self.score(Route::Relay)) {
            (Some(t), Some(r)) => {
                if t <= r {
                    Route::Tpu
                } else {
                    Route::Relay
                }
            }
            (Some(_), None) if self.counts(Route::Relay).1 > 0 => Route::Tpu,
            (None, Some(_)) if self.counts(Route::Tpu).1 > 0 => Route::Relay,
            _ => default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(10);

    #[test]
    fn the_delivery_estimate_follows_recent_outcomes() {
        let mut s = RouteStats::default();
        assert_eq!(s.delivery(Route::Tpu), None);
        s.record(Route::Tpu, Ok(D));
        assert_eq!(s.delivery(Route::Tpu), Some(1.0));
        for _ in 0..3 {
            s.record(Route::Tpu, Err(()));
        }
        let after = s.delivery(Route::Tpu).unwrap();
        assert!((after - 0.729).abs() < 1e-9, "{after}");
        for _ in 0..50 {
            s.record(Route::Tpu, Ok(D));
        }
        assert!(s.delivery(Route::Tpu).unwrap() > 0.99);
        assert_eq!(s.delivery(Route::Relay), None);
    }

    #[test]
    fn a_fast_primary_is_never_hedged() {
        let t0 = Instant::now();
        let mut h = Hedge::new(Route::Tpu, D);
        assert_eq!(h.on(Event::Start, t0), Some(Action::Send(Route::Tpu)));
        assert_eq!(h.deadline(), Some(t0 + D));
        assert_eq!(
            h.on(Event::Confirmed(Route::Tpu), t0 + D / 2),
            Some(Action::Landed(Route::Tpu))
        );
        assert_eq!(h.on(Event::Timer, t0 + D), None, "late timer ignored");
        assert!(!h.hedged() && h.phase() == Phase::Done && h.deadline().is_none());
    }

    #[test]
    fn a_silent_primary_is_hedged_once_at_the_delay() {
        let t0 = Instant::now();
        let mut h = Hedge::new(Route::Tpu, D);
        h.on(Event::Start, t0);
        assert_eq!(h.on(Event::Timer, t0 + D / 2), None, "early timer");
        assert_eq!(h.on(Event::Timer, t0 + D), Some(Action::Send(Route::Relay)));
        assert_eq!(h.hedged_at(), Some(t0 + D));
        assert_eq!(h.on(Event::Timer, t0 + 3 * D), None, "never a second hedge");
        assert_eq!(h.on(Event::Failed(Route::Tpu), t0 + 3 * D), None);
        assert_eq!(
            h.on(Event::Confirmed(Route::Relay), t0 + 4 * D),
            Some(Action::Landed(Route::Relay))
        );
    }

    #[test]
    fn a_failing_primary_is_hedged_at_once_and_both_failing_is_an_error() {
        let t0 = Instant::now();
        let mut h = Hedge::new(Route::Relay, D);
        h.on(Event::Start, t0);
        assert_eq!(
            h.on(Event::Failed(Route::Relay), t0 + Duration::from_millis(1)),
            Some(Action::Send(Route::Tpu))
        );
        assert_eq!(h.deadline(), None);
        assert_eq!(
            h.on(Event::Failed(Route::Tpu), t0 + D),
            Some(Action::Failed)
        );
        assert_eq!(
            h.on(Event::Confirmed(Route::Tpu), t0 + D),
            None,
            "done is done"
        );
    }

    #[test]
    fn events_before_start_do_nothing() {
        let t0 = Instant::now();
        let mut h = Hedge::new(Route::Tpu, D);
        for e in [
            Event::Timer,
            Event::Failed(Route::Tpu),
            Event::Confirmed(Route::Relay),
        ] {
            assert_eq!(h.on(e, t0), None);
        }
        assert_eq!(h.phase(), Phase::Idle);
    }

    #[test]
    fn statistics_move_the_preferred_route() {
        let mut s = RouteStats::default();
        assert_eq!(
            s.preferred(Route::Tpu),
            Route::Tpu,
            "default until measured"
        );
        for _ in 0..5 {
            s.record(Route::Tpu, Ok(Duration::from_millis(8)));
            s.record(Route::Relay, Ok(Duration::from_millis(4)));
        }
        assert_eq!(s.preferred(Route::Tpu), Route::Relay, "faster");
        for _ in 0..20 {
            s.record(Route::Relay, Err(()));
        }
        assert_eq!(
            s.preferred(Route::Tpu),
            Route::Tpu,
            "the relay keeps failing"
        );
        assert_eq!(s.counts(Route::Relay), (25, 20));
        let mut only_tpu = RouteStats::default();
        only_tpu.record(Route::Tpu, Ok(Duration::from_millis(9)));
        only_tpu.record(Route::Relay, Err(()));
        assert_eq!(only_tpu.preferred(Route::Relay), Route::Tpu);
    }

    proptest::proptest! {
        /// Whatever the order of events: at most one hedge, at most one final
        /// action, nothing after it, and the hedge never before the delay unless
        /// the primary failed.
        #[test]
        fn at_most_one_hedge_and_one_outcome(events in proptest::collection::vec((0u8..5, 0u64..30), 0..20)) {
            let t0 = Instant::now();
            let mut h = Hedge::new(Route::Tpu, D);
            h.on(Event::Start, t0);
            let (mut sends, mut finals) = (0, 0);
            let mut primary_failed = false;
            let mut clock = t0;
            for (kind, dt) in events {
                clock += Duration::from_millis(dt);
                let e = match kind {
                    0 => Event::Timer,
                    1 => Event::Failed(Route::Tpu),
                    2 => Event::Failed(Route::Relay),
                    3 => Event::Confirmed(Route::Tpu),
                    _ => Event::Confirmed(Route::Relay),
                };
                let done_before = h.phase() == Phase::Done;
                if e == Event::Failed(Route::Tpu) { primary_failed = true; }
                match h.on(e, clock) {
                    Some(Action::Send(r)) => {
                        proptest::prop_assert_eq!(r, Route::Relay);
                        proptest::prop_assert!(primary_failed || clock >= t0 + D);
                        sends += 1;
                    }
                    Some(_) => { proptest::prop_assert!(!done_before); finals += 1; }
                    None => {}
                }
            }
            proptest::prop_assert!(sends <= 1 && finals <= 1);
        }
    }
}
