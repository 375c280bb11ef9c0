//! Phase-aware congestion control: a [`Controller`] that wraps Cubic or BBR and
//! multiplies its window by `gain` while the sender says the connection's leader is
//! in its preferred phase (its slots are now or about to be). When the phase ends
//! the boost decays linearly to 1× over `decay` instead of collapsing at once, so
//! packets already queued are not suddenly over the window.
//!
//! The inner controller still sees every event, so its own state (slow start,
//! losses) evolves as it would without the boost; the boost shapes only `window()`.
//! A loss still shrinks the inner window, and the boosted window with it.

use crate::config::OutOfBounds;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::congestion::{
    BbrConfig, Controller, ControllerFactory, ControllerMetrics, CubicConfig,
};
use quinn_proto::RttEstimator;
use serde::Deserialize;

/// Which controller is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// quinn's CUBIC (RFC 8312).
    #[default]
    Cubic,
    /// quinn's BBR (experimental in quinn).
    Bbr,
}

/// `congestion` in the sender configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CongestionConfig {
    /// Wrapped controller.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Window multiplier during the preferred phase (1.0 = no boost; at most 16).
    #[serde(default = "default_gain")]
    pub boost_gain: f64,
    /// How long the boost takes to fade after the phase ends, milliseconds.
    #[serde(default = "default_decay")]
    pub decay_ms: u64,
}

fn default_gain() -> f64 {
    2.0
}
fn default_decay() -> u64 {
    400
}

impl Default for CongestionConfig {
    fn default() -> Self {
        CongestionConfig {
            algorithm: Algorithm::Cubic,
            boost_gain: default_gain(),
            decay_ms: default_decay(),
        }
    }
}

impl CongestionConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), OutOfBounds> {
        if !(1.0..=16.0).contains(&self.boost_gain) {
            return Err(OutOfBounds::new(
                "sender.tpu.congestion.boost_gain",
                format!("{} must be within 1..=16", self.boost_gain),
            ));
        }
        Ok(())
    }
}

/// The flag the sender sets while a leader is in its preferred phase.
#[derive(Debug, Default)]
pub struct PhaseSignal(AtomicBool);

impl PhaseSignal {
    /// A new, unboosted signal.
    pub fn new() -> Arc<Self> {
        Arc::new(PhaseSignal::default())
    }
    /// Enters or leaves the preferred phase.
    pub fn set(&self, boosted: bool) {
        self.0.store(boosted, Ordering::Relaxed);
    }
    /// Whether the phase is on.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Builds [`PhaseBoost`] controllers for one connection.
#[derive(Debug)]
pub struct PhaseBoostFactory {
    config: CongestionConfig,
    signal: Arc<PhaseSignal>,
}

impl PhaseBoostFactory {
    /// A factory whose controllers follow `signal`.
    pub fn new(config: CongestionConfig, signal: Arc<PhaseSignal>) -> Arc<Self> {
        Arc::new(PhaseBoostFactory { config, signal })
    }
}

impl ControllerFactory for PhaseBoostFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = match self.config.algorithm {
            Algorithm::Cubic => Arc::new(CubicConfig::default()).build(now, current_mtu),
            Algorithm::Bbr => Arc::new(BbrConfig::default()).build(now, current_mtu),
        };
        Box::new(PhaseBoost::new(
            inner,
            self.config.boost_gain.clamp(1.0, 16.0),
            Duration::from_millis(self.config.decay_ms),
            self.signal.clone(),
            now,
        ))
    }
}

/// The wrapping controller.
pub struct PhaseBoost {
    inner: Box<dyn Controller>,
    gain: f64,
    decay: Duration,
    signal: Arc<PhaseSignal>,
    /// The latest time quinn told us about (`window()` has no clock).
    now: Instant,
    /// Whether the phase was on at `now`.
    boosted: bool,
    /// When the phase last ended.
    ended: Option<Instant>,
}

impl PhaseBoost {
    /// Wraps `inner`.
    pub fn new(
        inner: Box<dyn Controller>,
        gain: f64,
        decay: Duration,
        signal: Arc<PhaseSignal>,
        now: Instant,
    ) -> Self {
        PhaseBoost {
            inner,
            gain,
            decay,
            boosted: signal.get(),
            signal,
            now,
            ended: None,
        }
    }

    /// The multiplier in force at the last event.
    pub fn factor(&self) -> f64 {
        if self.boosted {
            return self.gain;
        }
        match self.ended {
            Some(end) if !self.decay.is_zero() => {
                let left = 1.0
                    - self.now.saturating_duration_since(end).as_secs_f64()
                        / self.decay.as_secs_f64();
                1.0 + (self.gain - 1.0) * left.clamp(0.0, 1.0)
            }
            _ => 1.0,
        }
    }

    /// The wrapped controller's own window.
    pub fn inner_window(&self) -> u64 {
        self.inner.window()
    }

    fn observe(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        let on = self.signal.get();
        if self.boosted && !on {
            self.ended = Some(self.now);
        }
        self.boosted = on;
    }
}

impl Controller for PhaseBoost {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.observe(now);
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.observe(now);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.observe(now);
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.observe(now);
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let w = self.inner.window() as f64 * self.factor();
        if w >= u64::MAX as f64 {
            u64::MAX
        } else {
            w as u64
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(PhaseBoost {
            inner: self.inner.clone_box(),
            gain: self.gain,
            decay: self.decay,
            signal: self.signal.clone(),
            now: self.now,
            boosted: self.boosted,
            ended: self.ended,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(
        alg: Algorithm,
        gain: f64,
        decay_ms: u64,
    ) -> (Box<dyn Controller>, Arc<PhaseSignal>, Instant) {
        let signal = PhaseSignal::new();
        let cfg = CongestionConfig {
            algorithm: alg,
            boost_gain: gain,
            decay_ms,
        };
        let t0 = Instant::now();
        (
            PhaseBoostFactory::new(cfg, signal.clone()).build(t0, 1200),
            signal,
            t0,
        )
    }

    #[test]
    fn the_window_is_the_inner_window_until_the_phase_starts() {
        for alg in [Algorithm::Cubic, Algorithm::Bbr] {
            let (mut c, signal, t0) = controller(alg, 3.0, 100);
            let base = c.window();
            assert_eq!(base, c.initial_window(), "{alg:?}");
            signal.set(true);
            assert_eq!(c.window(), base, "the phase is noticed at the next event");
            c.on_sent(t0, 1200, 1);
            assert_eq!(c.window(), base * 3, "{alg:?} boosted");
        }
    }

    #[test]
    fn the_boost_decays_linearly_after_the_phase() {
        let (mut c, signal, t0) = controller(Algorithm::Cubic, 3.0, 100);
        let base = c.window();
        signal.set(true);
        c.on_sent(t0, 1200, 1);
        signal.set(false);
        c.on_sent(t0 + Duration::from_millis(10), 1200, 2);
        assert_eq!(
            c.window(),
            base * 3,
            "the phase ended at this event: full boost"
        );
        c.on_sent(t0 + Duration::from_millis(60), 1200, 3);
        let half = c.window() as f64 / base as f64;
        assert!(
            (half - 2.0).abs() < 0.01,
            "halfway through the decay: {half}"
        );
        c.on_sent(t0 + Duration::from_millis(200), 1200, 4);
        assert_eq!(c.window(), base, "decay over");
    }

    #[test]
    fn losses_still_shrink_the_boosted_window() {
        let (mut c, signal, t0) = controller(Algorithm::Cubic, 2.0, 0);
        signal.set(true);
        c.on_sent(t0, 1200, 1);
        let before = c.window();
        c.on_congestion_event(t0 + Duration::from_millis(5), t0, false, 1200);
        assert!(c.window() < before, "{} !< {before}", c.window());
        let pb = c.into_any().downcast::<PhaseBoost>().unwrap();
        assert_eq!(pb.window(), pb.inner_window() * 2);
    }

    #[test]
    fn gain_is_bounded() {
        let mut cfg = CongestionConfig::default();
        assert!(cfg.validate().is_ok());
        cfg.boost_gain = 0.5;
        assert!(cfg.validate().is_err());
        cfg.boost_gain = 100.0;
        assert!(cfg.validate().is_err());
    }
}
