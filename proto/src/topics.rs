//! MQTT topic names of the device-cloud protocol.
//!
//! Every device owns the prefix `nf/v1/{device_id}/` and nothing else; a stock broker
//! can enforce that with one ACL pattern (`nf/v1/%u/#`). The site is registry data,
//! so a device that moves to another hospital keeps its topics.

use std::fmt;

/// Root of every Nanofleet topic, versioned with the payload schema.
pub const ROOT: &str = "nf/v1";

/// Longest device id accepted in a topic. Ids are also client ids and certificate
/// common names, which keeps them short.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// The streams a device publishes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// `TelemetryBatch`, QoS 1.
    Telemetry,
    /// `EventBatch`, QoS 1.
    Events,
    /// `DeviceState`, QoS 1, retained (birth), and the last will (death).
    State,
    /// `Ack`: a device's answer to a command, QoS 1.
    Ack,
    /// `SignedBatchRecord`: the record of a finished run, QoS 1, kept on the device
    /// until acknowledged.
    Batch,
    /// `UpdateReport`: where a firmware update is, QoS 1.
    Update,
}

impl Channel {
    pub const ALL: [Channel; 6] =
        [Channel::Telemetry, Channel::Events, Channel::State, Channel::Ack, Channel::Batch, Channel::Update];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Telemetry => "telemetry",
            Channel::Events => "events",
            Channel::State => "state",
            Channel::Ack => "ack",
            Channel::Batch => "batch",
            Channel::Update => "update",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The topic a device publishes `channel` on.
pub fn device_topic(device_id: &str, channel: Channel) -> String {
    format!("{ROOT}/{device_id}/{}", channel.as_str())
}

/// The commands the cloud sends a device, each on its own topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `RecipeDelivery`: a released recipe, QoS 1.
    Recipe,
    /// `TrustRootUpdate`: newer trust root documents, QoS 1.
    TrustRoot,
    /// `RunRequest`: start a run for a pharmacist, QoS 1.
    Run,
    /// `UpdateCommand`: a signed firmware offer, or a withdrawal, QoS 1.
    Update,
    /// `Envelope` holding a `DenyList`: the lots and cartridges to refuse, QoS 1.
    DenyList,
}

impl Command {
    pub const ALL: [Command; 5] =
        [Command::Recipe, Command::TrustRoot, Command::Run, Command::Update, Command::DenyList];

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Recipe => "recipe",
            Command::TrustRoot => "trust-root",
            Command::Run => "run",
            Command::Update => "update",
            Command::DenyList => "deny-list",
        }
    }
}

/// The topic the cloud sends `command` to a device on.
pub fn command_topic(device_id: &str, command: Command) -> String {
    format!("{ROOT}/{device_id}/cmd/{}", command.as_str())
}

/// Filter a device subscribes to for all its commands.
pub fn command_filter(device_id: &str) -> String {
    format!("{ROOT}/{device_id}/cmd/+")
}

/// The command a topic carries, if it is one of `device_id`'s command topics.
pub fn parse_command_topic(device_id: &str, topic: &str) -> Option<Command> {
    let kind = topic.strip_prefix(ROOT)?.strip_prefix('/')?.strip_prefix(device_id)?.strip_prefix("/cmd/")?;
    Command::ALL.into_iter().find(|c| c.as_str() == kind)
}

/// Filter matching `channel` of every device, for an ingest subscription.
pub fn all_devices_filter(channel: Channel) -> String {
    format!("{ROOT}/+/{}", channel.as_str())
}

/// Prefix a device may publish and subscribe under.
pub fn device_prefix(device_id: &str) -> String {
    format!("{ROOT}/{device_id}/")
}

/// Why a topic is not a device topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {topic:?} is not under {ROOT}/{{device}}/")]
    NotNanofleet { topic: String },
    #[error("topic {topic:?}: device id {device_id:?} is invalid: {reason}")]
    BadDeviceId { topic: String, device_id: String, reason: &'static str },
    #[error(
        "topic {topic:?}: unknown channel {channel:?}, allowed: telemetry, events, state, ack, batch, update"
    )]
    UnknownChannel { topic: String, channel: String },
}

/// Checks a device id: 1 to 64 characters of `A-Z a-z 0-9 - _ .`, so it is safe as a
/// topic level, a client id and a certificate common name.
pub fn validate_device_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("empty");
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return Err("longer than 64 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err("only A-Z, a-z, 0-9, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// Splits a device-published topic into its device id and channel.
pub fn parse_device_topic(topic: &str) -> Result<(&str, Channel), TopicError> {
    let not_ours = || TopicError::NotNanofleet { topic: topic.to_owned() };
    let rest = topic.strip_prefix(ROOT).and_then(|r| r.strip_prefix('/')).ok_or_else(not_ours)?;
    let (device_id, channel) = rest.split_once('/').ok_or_else(not_ours)?;
    validate_device_id(device_id).map_err(|reason| TopicError::BadDeviceId {
        topic: topic.to_owned(),
        device_id: device_id.to_owned(),
        reason,
    })?;
    let channel = Channel::ALL
        .into_iter()
        .find(|c| c.as_str() == channel)
        .ok_or_else(|| TopicError::UnknownChannel { topic: topic.to_owned(), channel: channel.to_owned() })?;
    Ok((device_id, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_topics_round_trip_through_parse() {
        for c in Channel::ALL {
            let t = device_topic("NF-0001", c);
            assert_eq!(parse_device_topic(&t), Ok(("NF-0001", c)));
        }
    }

    #[test]
    fn parse_rejects_foreign_and_malformed_topics() {
        assert!(matches!(parse_device_topic("other/x/telemetry"), Err(TopicError::NotNanofleet { .. })));
        assert!(matches!(parse_device_topic("nf/v1/dev"), Err(TopicError::NotNanofleet { .. })));
        assert!(matches!(parse_device_topic("nf/v1//telemetry"), Err(TopicError::BadDeviceId { .. })));
        assert!(matches!(parse_device_topic("nf/v1/a+b/telemetry"), Err(TopicError::BadDeviceId { .. })));
        assert!(matches!(
            parse_device_topic("nf/v1/dev/telemetry/extra"),
            Err(TopicError::UnknownChannel { .. })
        ));
        assert!(matches!(parse_device_topic("nf/v1/dev/cmd/recipe"), Err(TopicError::UnknownChannel { .. })));
    }

    #[test]
    fn device_id_length_is_bounded() {
        assert!(validate_device_id(&"a".repeat(64)).is_ok());
        assert!(validate_device_id(&"a".repeat(65)).is_err());
    }
}
