//! The typed meaning of a command's `args` map, and its bounds. One parser for the
//! CLI (refuse to sign nonsense), the edge (reject early) and the sidecar (apply).

use std::collections::BTreeMap;

use crate::code::{Code, Reject};
use crate::names::Action;

/// Most `args` entries a command may carry.
pub const MAX_ARGS: usize = 32;
/// Longest `args` key, bytes.
pub const MAX_ARG_KEY: usize = 64;
/// Longest `args` value, bytes.
pub const MAX_ARG_VALUE: usize = 1024;
/// Most rungs in a tip ladder.
pub const MAX_TIP_LADDER: usize = 16;

/// The args the modules understand. Unknown keys are allowed (newer clients) but bounded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandArgs {
    /// `throttle_pct`: 0..=100, share of normal send rate.
    pub throttle_pct: Option<u8>,
    /// `ev_min`: minimum expected value for a send.
    pub ev_min: Option<f64>,
    /// `tip_ladder`: comma-separated non-negative tips, at most [`MAX_TIP_LADDER`].
    pub tip_ladder: Option<Vec<f64>>,
}

fn bad(detail: String) -> Reject {
    Reject::with(Code::BadArgs, detail)
}

fn finite(key: &str, s: &str) -> Result<f64, Reject> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .ok_or_else(|| {
            bad(format!(
                "`{key}` must be a finite number, got `{}`",
                s.escape_debug()
            ))
        })
}

impl CommandArgs {
    /// Parses and bounds-checks `args` for `action`.
    pub fn parse(action: Action, args: &BTreeMap<String, String>) -> Result<CommandArgs, Reject> {
        if args.len() > MAX_ARGS {
            return Err(bad(format!("{} args; at most {MAX_ARGS}", args.len())));
        }
        for (k, v) in args {
            if k.is_empty() || k.len() > MAX_ARG_KEY || v.len() > MAX_ARG_VALUE {
                return Err(bad(format!(
                    "arg keys must be 1..={MAX_ARG_KEY} bytes and values at most {MAX_ARG_VALUE}"
                )));
            }
        }
        let mut out = CommandArgs::default();
        if let Some(v) = args.get("throttle_pct") {
            let pct = v
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| {
                    bad(format!(
                        "`throttle_pct` must be an integer 0..=100, got `{}`",
                        v.escape_debug()
                    ))
                })?;
            out.throttle_pct = Some(pct);
        }
        if let Some(v) = args.get("ev_min") {
            out.ev_min = Some(finite("ev_min", v)?);
        }
        if let Some(v) = args.get("tip_ladder") {
            let rungs = v
                .split(',')
                .map(|x| finite("tip_ladder", x))
                .collect::<Result<Vec<_>, _>>()?;
            if rungs.len() > MAX_TIP_LADDER || rungs.iter().any(|t| *t < 0.0) {
                return Err(bad(format!(
                    "`tip_ladder` must hold 1..={MAX_TIP_LADDER} non-negative tips"
                )));
            }
            // Rung i is a searcher's variant i: a variant missing for the rung a
            // score reaches is taken from a lower rung, which must not pay more.
            if rungs.windows(2).any(|w| w[1] < w[0]) {
                return Err(bad(
                    "`tip_ladder` must be in ascending order (rung i is the variant with the i-th tip)"
                        .into(),
                ));
            }
            out.tip_ladder = Some(rungs);
        }
        match action {
            Action::Throttle if out.throttle_pct.is_none() => {
                Err(bad("throttle needs `throttle_pct`".into()))
            }
            Action::Policy if out.ev_min.is_none() && out.tip_ladder.is_none() => {
                Err(bad("policy needs `ev_min` or `tip_ladder`".into()))
            }
            _ => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_the_original_api_forms() {
        let a = CommandArgs::parse(
            Action::Policy,
            &m(&[
                ("ev_min", "0.25"),
                ("tip_ladder", "0.1,0.2,0.35"),
                ("future_knob", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(a.ev_min, Some(0.25));
        assert_eq!(a.tip_ladder, Some(vec![0.1, 0.2, 0.35]));
        let t = CommandArgs::parse(Action::Throttle, &m(&[("throttle_pct", "40")])).unwrap();
        assert_eq!(t.throttle_pct, Some(40));
        assert!(CommandArgs::parse(Action::Kill, &m(&[])).is_ok());
    }

    #[test]
    fn rejects_out_of_range_and_missing() {
        for (action, args) in [
            (Action::Throttle, m(&[("throttle_pct", "101")])),
            (Action::Throttle, m(&[("throttle_pct", "-1")])),
            (Action::Throttle, m(&[("throttle_pct", "4.5")])),
            (Action::Throttle, m(&[])),
            (Action::Policy, m(&[])),
            (Action::Policy, m(&[("ev_min", "NaN")])),
            (Action::Policy, m(&[("ev_min", "inf")])),
            (Action::Policy, m(&[("tip_ladder", "0.1,,0.2")])),
            (Action::Policy, m(&[("tip_ladder", "0.1,-0.2")])),
            // Not ascending: a score of 4 could send the 5 tip (rung 2 of 1,5,3
            // taken from variant 1 when only two were signed).
            (Action::Policy, m(&[("tip_ladder", "1,5,3")])),
            (
                Action::Policy,
                m(&[("tip_ladder", &vec!["1"; 17].join(","))]),
            ),
            (Action::Start, m(&[("", "x")])),
            (Action::Start, m(&[("k", &"v".repeat(MAX_ARG_VALUE + 1))])),
        ] {
            let e = CommandArgs::parse(action, &args).unwrap_err();
            assert_eq!(e.code, Code::BadArgs, "{args:?}");
        }
        let many: BTreeMap<_, _> = (0..=MAX_ARGS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert_eq!(
            CommandArgs::parse(Action::Start, &many).unwrap_err().code,
            Code::BadArgs
        );
    }
}
