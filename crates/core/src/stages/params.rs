//! Typed parameters: each stage kind's fields are one serde struct (unknown fields refused),
//! closed sets are enums declared with [`closed_set!`], and the kind's schema table
//! ([`super::ParamSpec`]s: doc, default, range, in-key flag) sits beside the struct. The table
//! drives validation, "did you mean", the defaults, the reference pages and the key; the
//! struct is what a stage's `run` reads ([`super::StageContext::typed`]). [`check_table`]
//! (run by each kind's unit test) keeps the two naming exactly the same fields, and every
//! value of every closed set parsing to its enum.
use super::{ParamSpec, ParamType};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Declares a closed set: an enum whose variants are written with their pipeline-file names
/// (`Variant = "name"`); derives serde under those names and adds `NAMES` (the names in
/// order, for [`ParamSpec::one_of`]), `ALL`, `name()`, `from_name()` and `Display`.
#[macro_export]
macro_rules! closed_set {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$variant_meta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        $vis enum $name {
            $($(#[$variant_meta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every accepted name, in the order messages and reference pages list them.
            pub const NAMES: &'static [&'static str] = &[$($text),+];
            /// Every value, in the order of [`Self::NAMES`].
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            /// The name pipeline files use.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
            /// The value named `text`, if any.
            pub fn from_name(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|value| value.name() == text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

/// An input field as written (a stage name or a path, or a list of them). The runner resolves
/// inputs before a stage runs; the stage reads the resolved paths from
/// [`super::StageContext::inputs`], never this text.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Input(pub Value);

/// A field that takes one value or a list (`steps: 20` or `steps: [20, 50]`): always a list.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(from = "OneOrMany<T>")]
pub struct List<T>(pub Vec<T>);

/// The two forms a [`List`] field may be written in.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl<T> From<OneOrMany<T>> for List<T> {
    fn from(value: OneOrMany<T>) -> Self {
        match value {
            OneOrMany::Many(items) => Self(items),
            OneOrMany::One(item) => Self(vec![item]),
        }
    }
}

impl<T> std::ops::Deref for List<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

/// The typed parameters of a kind from its validated map (every schema field present,
/// defaults filled in). Unknown fields are refused (`deny_unknown_fields` on each kind's
/// struct; serde applies it to the fields of flattened structs too).
pub fn parse<P: DeserializeOwned>(params: &Map<String, Value>) -> Result<P, serde_json::Error> {
    serde_json::from_value(Value::Object(params.clone()))
}

/// The typed parameters of a kind from `given` with every other field at its schema default
/// (what a library caller gets without a pipeline file).
pub fn with_defaults<P: DeserializeOwned>(
    schema: &[ParamSpec],
    given: Map<String, Value>,
) -> Result<P, serde_json::Error> {
    let mut params = given;
    for spec in schema {
        if let Some(default) = &spec.default {
            params.entry(spec.name).or_insert_with(|| default.clone());
        }
    }
    parse(&params)
}

/// Checks that `schema` and the struct `P` name the same fields: a map of every field (its
/// default, or a sample value for a required one) parses and serializes back to the same
/// fields with the same values, every name of every closed set parses, and an extra field is
/// refused. Returns what disagrees.
pub fn check_table<P: DeserializeOwned + Serialize>(schema: &[ParamSpec]) -> Result<(), String> {
    let map: Map<String, Value> = schema
        .iter()
        .map(|spec| (spec.name.to_string(), sample(spec)))
        .collect();
    round_trip::<P>(schema, &map)?;
    for spec in schema {
        for name in spec.allowed.unwrap_or_default() {
            let mut variant = map.clone();
            let value = match spec.ty {
                ParamType::StringList => Value::from(vec![*name]),
                _ => Value::from(*name),
            };
            variant.insert(spec.name.to_string(), value);
            round_trip::<P>(schema, &variant)
                .map_err(|e| format!("`{}: {name}`: {e}", spec.name))?;
        }
    }
    let mut extra = map;
    extra.insert("not_a_field".to_string(), Value::Bool(true));
    match parse::<P>(&extra) {
        Err(e) if e.to_string().contains("unknown field `not_a_field`") => Ok(()),
        Err(e) => Err(format!("an unknown field fails otherwise: {e}")),
        Ok(_) => Err("an unknown field is not refused".to_string()),
    }
}

/// Parses `map` and compares the serialized struct with it, field by field.
fn round_trip<P: DeserializeOwned + Serialize>(
    schema: &[ParamSpec],
    map: &Map<String, Value>,
) -> Result<(), String> {
    let typed: P = parse(map).map_err(|e| format!("does not parse: {e}"))?;
    let back = match serde_json::to_value(&typed).map_err(|e| e.to_string())? {
        Value::Object(back) => back,
        other => return Err(format!("serializes as {other}")),
    };
    let names: Vec<&str> = schema.iter().map(|spec| spec.name).collect();
    let missing: Vec<&String> = back
        .keys()
        .filter(|k| !names.contains(&k.as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(format!("struct fields missing from the table: {missing:?}"));
    }
    for spec in schema {
        let (given, found) = (&map[spec.name], back.get(spec.name));
        if found != Some(&as_list(spec, given)) {
            return Err(format!(
                "field `{}`: {given} comes back as {found:?}",
                spec.name
            ));
        }
    }
    Ok(())
}

/// `value` as a [`List`] field serializes it (a single value as a one-item list).
fn as_list(spec: &ParamSpec, value: &Value) -> Value {
    let listed = matches!(
        spec.ty,
        ParamType::IntegerList | ParamType::NumberList | ParamType::StringList
    );
    match value {
        Value::Array(_) | Value::Null => value.clone(),
        single if listed => Value::Array(vec![single.clone()]),
        _ => value.clone(),
    }
}

/// A field's default, or a value of its type for a required field.
fn sample(spec: &ParamSpec) -> Value {
    if let Some(default) = &spec.default {
        return default.clone();
    }
    let first = spec.allowed.and_then(|names| names.first().copied());
    match spec.ty {
        ParamType::Integer => Value::from(1),
        ParamType::Number => Value::from(1.5),
        ParamType::Bool => Value::Bool(true),
        ParamType::IntegerList => Value::from(vec![1, 2]),
        ParamType::NumberList => Value::from(vec![0.5, 1.5]),
        ParamType::StringList | ParamType::PathList | ParamType::StageRefList => {
            Value::from(vec![first.unwrap_or("a")])
        }
        ParamType::PathOrStageRefList => Value::from(vec!["a", "b"]),
        _ => Value::from(first.unwrap_or("a")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    closed_set! {
        /// A test set.
        pub enum Colour { Red = "red", DarkBlue = "dark-blue" }
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Shared {
        colour: Colour,
        steps: List<u32>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        #[serde(flatten)]
        shared: Shared,
    }

    fn schema() -> Vec<ParamSpec> {
        vec![
            ParamSpec::required("name", ParamType::String, "a name"),
            ParamSpec::optional("colour", ParamType::String, json!("red"), "a colour")
                .one_of(Colour::NAMES),
            ParamSpec::optional("steps", ParamType::IntegerList, json!(5), "steps"),
        ]
    }

    #[test]
    fn closed_sets_name_their_variants() {
        assert_eq!(Colour::NAMES, ["red", "dark-blue"]);
        assert_eq!(Colour::DarkBlue.name(), "dark-blue");
        assert_eq!(Colour::from_name("red"), Some(Colour::Red));
        assert_eq!(Colour::from_name("blue"), None);
        assert_eq!(Colour::DarkBlue.to_string(), "dark-blue");
    }

    #[test]
    fn flattened_structs_refuse_unknown_fields_and_lists_take_one_value() {
        let map = |value: Value| value.as_object().cloned().expect("object");
        let outer: Outer = parse(&map(
            json!({"name": "n", "colour": "dark-blue", "steps": 3}),
        ))
        .expect("parses");
        assert_eq!(
            (outer.shared.colour, &*outer.shared.steps),
            (Colour::DarkBlue, &[3][..])
        );
        let error = parse::<Outer>(&map(
            json!({"name": "n", "colour": "red", "steps": [1], "x": 1}),
        ));
        assert!(error.is_err(), "{:?}", error.map(|o| o.name));
        let defaults: Outer = with_defaults(&schema(), map(json!({"name": "n"}))).expect("fills");
        assert_eq!(
            (defaults.shared.colour, &*defaults.shared.steps),
            (Colour::Red, &[5][..])
        );
    }

    #[test]
    fn check_table_finds_a_field_the_table_lacks_or_adds() {
        check_table::<Outer>(&schema()).expect("agrees");
        let mut short = schema();
        short.pop();
        assert!(check_table::<Outer>(&short).is_err());
        let mut long = schema();
        long.push(ParamSpec::optional(
            "extra",
            ParamType::Bool,
            json!(false),
            "x",
        ));
        assert!(check_table::<Outer>(&long).is_err());
        let mut wrong = schema();
        wrong[1] = wrong[1].clone().one_of(&["red", "blue"]);
        assert!(check_table::<Outer>(&wrong).is_err());
    }
}
