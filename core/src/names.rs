//! Modules and actions: the proto enum numbers and the lowercase names used in
//! routes (`/api/control/module/{name}:{action}`), key scopes and the CLI.

use gw_proto::control::command;

/// A trading module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    /// `ARBITRAGE = 0`.
    Arbitrage,
    /// `MEV = 1`.
    Mev,
}

/// A control action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// `START = 0`.
    Start,
    /// `STOP = 1`.
    Stop,
    /// `RESTART = 2`.
    Restart,
    /// `THROTTLE = 3`.
    Throttle,
    /// `POLICY = 4`.
    Policy,
    /// `KILL = 5`.
    Kill,
}

impl serde::Serialize for Module {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Module {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Module, D::Error> {
        let s = String::deserialize(d)?;
        Module::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown module `{s}`")))
    }
}

impl Module {
    /// Every module.
    pub const ALL: [Module; 2] = [Module::Arbitrage, Module::Mev];

    /// Lowercase route name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Module::Arbitrage => "arbitrage",
            Module::Mev => "mev",
        }
    }

    /// Parses a lowercase route name.
    pub fn parse(s: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// From the proto enum number; `None` for values this build does not know.
    pub fn from_proto(v: i32) -> Option<Module> {
        match command::Module::try_from(v).ok()? {
            command::Module::Arbitrage => Some(Module::Arbitrage),
            command::Module::Mev => Some(Module::Mev),
        }
    }

    /// The proto enum value.
    pub fn to_proto(self) -> command::Module {
        match self {
            Module::Arbitrage => command::Module::Arbitrage,
            Module::Mev => command::Module::Mev,
        }
    }
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 6] = [
        Action::Start,
        Action::Stop,
        Action::Restart,
        Action::Throttle,
        Action::Policy,
        Action::Kill,
    ];

    /// Lowercase route name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
            Action::Throttle => "throttle",
            Action::Policy => "policy",
            Action::Kill => "kill",
        }
    }

    /// Parses a lowercase route name.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// From the proto enum number; `None` for values this build does not know.
    pub fn from_proto(v: i32) -> Option<Action> {
        Some(match command::Action::try_from(v).ok()? {
            command::Action::Start => Action::Start,
            command::Action::Stop => Action::Stop,
            command::Action::Restart => Action::Restart,
            command::Action::Throttle => Action::Throttle,
            command::Action::Policy => Action::Policy,
            command::Action::Kill => Action::Kill,
        })
    }

    /// The proto enum value.
    pub fn to_proto(self) -> command::Action {
        match self {
            Action::Start => command::Action::Start,
            Action::Stop => command::Action::Stop,
            Action::Restart => command::Action::Restart,
            Action::Throttle => command::Action::Throttle,
            Action::Policy => command::Action::Policy,
            Action::Kill => command::Action::Kill,
        }
    }
}

/// Parses the `{name}:{action}` part of a control route (`…/module/{name}:{action}`,
/// whatever the route's prefix); `None` when it is not of that shape or names
/// unknown ones.
pub fn parse_module_spec(spec: &str) -> Option<(Module, Action)> {
    let (m, a) = spec.split_once(':')?;
    Some((Module::parse(m)?, Action::parse(a)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_numbers_are_the_wire_contract() {
        for (i, m) in Module::ALL.iter().enumerate() {
            assert_eq!(m.to_proto() as i32, i as i32);
            assert_eq!(Module::from_proto(i as i32), Some(*m));
        }
        for (i, a) in Action::ALL.iter().enumerate() {
            assert_eq!(a.to_proto() as i32, i as i32);
            assert_eq!(Action::from_proto(i as i32), Some(*a));
        }
        assert_eq!(Module::from_proto(2), None);
        assert_eq!(Action::from_proto(-1), None);
    }

    #[test]
    fn routes() {
        assert_eq!(
            parse_module_spec("mev:throttle"),
            Some((Module::Mev, Action::Throttle))
        );
        assert_eq!(
            parse_module_spec("arbitrage:kill"),
            Some((Module::Arbitrage, Action::Kill))
        );
        assert_eq!(parse_module_spec("mev"), None);
        assert_eq!(parse_module_spec("hft:stop"), None);
        assert_eq!(parse_module_spec("commands"), None);
        assert_eq!(
            parse_module_spec("mev:stop"),
            Some((Module::Mev, Action::Stop))
        );
        assert_eq!(parse_module_spec("mev:stop:now"), None);
        assert_eq!(parse_module_spec("mev"), None);
    }
}
