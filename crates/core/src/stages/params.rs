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

        impl $crate::stages::params::FieldType for $name {
            const TYPE: $crate::stages::ParamType = $crate::stages::ParamType::String;
            const ALLOWED: Option<&'static [&'static str]> = Some(Self::NAMES);
        }

        impl $crate::stages::params::ItemType for $name {
            const LIST: $crate::stages::ParamType = $crate::stages::ParamType::StringList;
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

pub use dreampipe_derive::Params;

/// A kind's parameter table, derived from its struct by `#[derive(Params)]` (see
/// `dreampipe_derive`): one [`ParamSpec`] per field, flattened structs' tables spliced in.
pub trait ParamTable {
    fn param_specs() -> Vec<ParamSpec>;
}

/// How a field's Rust type appears in the table: its [`ParamType`] and, for closed sets,
/// the accepted names.
pub trait FieldType {
    const TYPE: ParamType;
    const ALLOWED: Option<&'static [&'static str]> = None;
}

/// The list type of an item type (`List<u64>` is an `IntegerList`).
pub trait ItemType {
    const LIST: ParamType;
}

macro_rules! field_types {
    ($($ty:ty => $param:ident / $list:ident),+ $(,)?) => {
        $(
            impl FieldType for $ty {
                const TYPE: ParamType = ParamType::$param;
            }
            impl ItemType for $ty {
                const LIST: ParamType = ParamType::$list;
            }
        )+
    };
}

field_types! {
    u32 => Integer / IntegerList,
    u64 => Integer / IntegerList,
    usize => Integer / IntegerList,
    i64 => Integer / IntegerList,
    f64 => Number / NumberList,
    String => String / StringList,
}

impl FieldType for bool {
    const TYPE: ParamType = ParamType::Bool;
}

impl<T: FieldType> FieldType for Option<T> {
    const TYPE: ParamType = T::TYPE;
    const ALLOWED: Option<&'static [&'static str]> = T::ALLOWED;
}

impl<T: FieldType + ItemType> FieldType for List<T> {
    const TYPE: ParamType = T::LIST;
    const ALLOWED: Option<&'static [&'static str]> = T::ALLOWED;
}

impl<T: FieldType + ItemType> FieldType for Vec<T> {
    const TYPE: ParamType = T::LIST;
    const ALLOWED: Option<&'static [&'static str]> = T::ALLOWED;
}

/// Inputs name stages and/or paths; the field says which (`#[param(ty = StageRef)]`, …).
impl FieldType for Input {
    const TYPE: ParamType = ParamType::PathOrStageRef;
}

/// `spec` restricted to `allowed` when the field's type is a closed set.
pub fn with_choices(spec: ParamSpec, allowed: Option<&'static [&'static str]>) -> ParamSpec {
    match allowed {
        Some(names) => spec.one_of(names),
        None => spec,
    }
}

/// The name of field `$field` of struct `$ty`, checked by the compiler: rules between fields
/// and field errors name fields through it, so a field's name is written once, on the struct.
#[macro_export]
macro_rules! field {
    ($ty:ty, $field:ident) => {{
        #[allow(dead_code)]
        fn field_exists(params: &$ty) {
            let _ = &params.$field;
        }
        stringify!($field)
    }};
}

/// The spec of field `name` in `specs`, to adjust what a kind's script does differently
/// (defaults of the shared training fields).
pub fn spec_mut<'a>(specs: &'a mut [ParamSpec], name: &str) -> &'a mut ParamSpec {
    specs
        .iter_mut()
        .find(|spec| spec.name == name)
        .unwrap_or_else(|| panic!("no field `{name}` in the table"))
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

    #[derive(Debug, Serialize, Deserialize, Params)]
    #[serde(deny_unknown_fields)]
    struct Shared {
        /// a colour
        #[param(default = "red")]
        colour: Colour,
        /// steps
        #[param(default = 5)]
        steps: List<u32>,
    }

    #[derive(Debug, Serialize, Deserialize, Params)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        /// a name
        name: String,
        #[serde(flatten)]
        shared: Shared,
    }

    fn schema() -> Vec<ParamSpec> {
        Outer::param_specs()
    }

    /// Every option of `#[param]`, on one struct.
    #[derive(Serialize, Deserialize, Params)]
    struct Options {
        /// a model
        ///   on two lines
        #[param(ty = PathOrStageRefList, model_folder, gathers)]
        models: Input,
        /// a side
        #[param(default = null, range(8.0, 64.0), multiple_of = 8)]
        side: Option<u32>,
        /// a batch
        #[param(default = 1, not_in_key)]
        batch: u64,
        /// a later field
        #[param(default = [], keyed_when_set)]
        later: List<f64>,
        /// letters
        #[param(default = ["a"], one_of = &["a", "b"])]
        letters: List<String>,
    }

    #[test]
    fn the_derived_table_follows_the_fields_and_their_options() {
        let specs = Options::param_specs();
        let names: Vec<&str> = specs.iter().map(|spec| spec.name).collect();
        assert_eq!(names, ["models", "side", "batch", "later", "letters"]);
        let [models, side, batch, later, letters] = &specs[..] else {
            panic!("five specs")
        };
        assert_eq!(
            (
                models.ty,
                models.default.clone(),
                models.model,
                models.gather
            ),
            (ParamType::PathOrStageRefList, None, true, true)
        );
        assert_eq!(models.doc, "a model on two lines");
        assert_eq!(
            (side.ty, side.default.clone(), side.min, side.max, side.step),
            (
                ParamType::Integer,
                Some(Value::Null),
                Some(8.0),
                Some(64.0),
                Some(8)
            )
        );
        assert_eq!((batch.ty, batch.in_key), (ParamType::Integer, false));
        assert_eq!(
            (later.ty, later.default.clone(), later.key_default),
            (ParamType::NumberList, Some(json!([])), false)
        );
        assert_eq!(
            (letters.ty, letters.allowed),
            (ParamType::StringList, Some(&["a", "b"][..]))
        );
        let outer = schema();
        assert_eq!(
            outer[1].allowed,
            Some(Colour::NAMES),
            "a closed set lists its names"
        );
        assert_eq!(outer[1].ty, ParamType::String);
        assert_eq!(field!(Shared, steps), "steps");
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
        let mut required = schema();
        required[2].default = None;
        assert!(
            check_table::<Outer>(&required).is_ok(),
            "a sample value parses"
        );
        assert!(check_table::<Outer>(&wrong).is_err());
    }
}
