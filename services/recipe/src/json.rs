//! Recipes as JSON (the proto3 JSON mapping), for people writing and reviewing them.
//!
//! Field names are the proto's own (`np_ratio`, as validation errors name them); the
//! reader also takes the lowerCamelCase names of the mapping. Every field is written,
//! defaults included, so a reviewer sees the whole recipe. Unknown fields are refused:
//! a misspelt field would otherwise silently take its default.

use std::sync::OnceLock;

use nanofleet_proto::FILE_DESCRIPTOR_SET;
use nanofleet_proto::device::v1::Recipe;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};

const RECIPE_MESSAGE: &str = "nanofleet.device.v1.Recipe";

/// The `Recipe` descriptor from the descriptor set compiled into `nanofleet-proto`.
fn recipe_descriptor() -> Result<&'static MessageDescriptor, String> {
    static DESCRIPTOR: OnceLock<Result<MessageDescriptor, String>> = OnceLock::new();
    DESCRIPTOR
        .get_or_init(|| {
            let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET)
                .map_err(|e| format!("the built-in descriptor set does not decode ({e})"))?;
            pool.get_message_by_name(RECIPE_MESSAGE)
                .ok_or_else(|| format!("the built-in descriptor set has no {RECIPE_MESSAGE}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Reads a recipe from its JSON form. The error names the field or position that is
/// wrong.
pub fn recipe_from_json(text: &str) -> Result<Recipe, String> {
    let desc = recipe_descriptor()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let message = DynamicMessage::deserialize_with_options(
        desc.clone(),
        &mut de,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| format!("recipe JSON: {e}"))?;
    de.end().map_err(|e| format!("recipe JSON: {e}"))?;
    message.transcode_to::<Recipe>().map_err(|e| format!("recipe JSON: {e}"))
}

/// The JSON form of `r`. `Null` only if the descriptor set compiled into
/// `nanofleet-proto` lacks `Recipe`, which the tests of this crate rule out.
pub fn recipe_to_json(r: &Recipe) -> serde_json::Value {
    match recipe_descriptor() {
        Ok(desc) => with_descriptor(desc, r),
        Err(_) => serde_json::Value::Null,
    }
}

/// The proto3 JSON form of message `msg` whose full name is `full_name` (such as
/// `nanofleet.device.v1.BatchRecord`), every field written. `Null` for a name the
/// compiled descriptor set does not hold.
pub fn to_json(full_name: &str, msg: &impl nanofleet_proto::prost::Message) -> serde_json::Value {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    let desc = POOL
        .get_or_init(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).ok())
        .as_ref()
        .and_then(|p| p.get_message_by_name(full_name));
    match desc {
        Some(desc) => with_descriptor(&desc, msg),
        None => serde_json::Value::Null,
    }
}

fn with_descriptor(
    desc: &MessageDescriptor,
    msg: &impl nanofleet_proto::prost::Message,
) -> serde_json::Value {
    let mut message = DynamicMessage::new(desc.clone());
    if message.transcode_from(msg).is_err() {
        return serde_json::Value::Null;
    }
    let options = SerializeOptions::new().use_proto_field_name(true).skip_default_fields(false);
    message.serialize_with_options(serde_json::value::Serializer, &options).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use nanofleet_proto::device::v1::Targets;

    use super::*;
    use crate::example::example;

    fn recipe() -> Recipe {
        example(
            "flu-h5",
            3,
            Targets { site_ids: vec!["site-a".into()], device_ids: vec!["NF-0001".into()] },
            1_750_000_000_000,
        )
    }

    #[test]
    fn the_descriptor_set_holds_the_recipe() {
        recipe_descriptor().unwrap();
    }

    #[test]
    fn a_recipe_survives_a_round_trip() {
        let r = recipe();
        let json = recipe_to_json(&r);
        assert_eq!(json["formula"]["np_ratio"], 6.0);
        assert_eq!(json["payload"], "PAYLOAD_KIND_MRNA");
        assert_eq!(json["procedure"][5]["phase"], "RUN_PHASE_COLLECT");
        assert_eq!(recipe_from_json(&json.to_string()).unwrap(), r);
        assert_eq!(recipe_from_json(&serde_json::to_string_pretty(&json).unwrap()).unwrap(), r);
    }

    #[test]
    fn camel_case_names_and_numbers_are_read() {
        let r = recipe_from_json(
            r#"{"recipeId": "flu-h5", "version": 2, "formula": {"npRatio": 6, "lipids": {"pegLipid": 1.5}},
                "validFromUnixMs": 1750000000000, "validUntilUnixMs": "1760000000000"}"#,
        )
        .unwrap();
        assert_eq!(r.recipe_id, "flu-h5");
        assert_eq!(r.formula.as_ref().unwrap().np_ratio, 6.0);
        assert_eq!(r.formula.unwrap().lipids.unwrap().peg_lipid, 1.5);
        assert_eq!(r.valid_until_unix_ms, 1_760_000_000_000);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_by_name() {
        let err = recipe_from_json(r#"{"recipe_id": "a", "formula": {"np_ration": 6}}"#).unwrap_err();
        assert!(err.contains("np_ration"), "{err}");
        let err = recipe_from_json(r#"{"payload": "PAYLOAD_KIND_PROTEIN"}"#).unwrap_err();
        assert!(err.contains("PAYLOAD_KIND_PROTEIN"), "{err}");
        let err = recipe_from_json(r#"{"version": -1}"#).unwrap_err();
        assert!(err.starts_with("recipe JSON"), "{err}");
        let err = recipe_from_json(r#"{"version": 1} trailing"#).unwrap_err();
        assert!(err.contains("trailing"), "{err}");
        assert!(recipe_from_json("").is_err());
    }
}
